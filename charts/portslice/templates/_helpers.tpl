{{/* Name of the release's objects: "<release>" when it already contains "portslice". */}}
{{- define "portslice.fullname" -}}
{{- if contains "portslice" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-portslice" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "portslice.labels" -}}
app.kubernetes.io/name: portslice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "portslice.selector" -}}
app.kubernetes.io/name: portslice
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "portslice.operatorImage" -}}
{{ .Values.image.operator.repository }}:{{ .Values.image.operator.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "portslice.nodeImage" -}}
{{ .Values.image.node.repository }}:{{ .Values.image.node.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The pool as one comma-separated flag value, checked at render time by the rule the
operator and the node daemon apply at start (crds/ports/src/pool.rs: no range below 1024, none
touching the NodePort range). e2e/tests/chart.rs keeps the two in agreement. */}}
{{- define "portslice.pool" -}}
{{- if not .Values.pools -}}{{- fail "pools: at least one port range is required, e.g. [\"40000-59999\"]" -}}{{- end -}}
{{- $np := splitList "-" (toString .Values.cluster.nodePortRange) -}}
{{- $npStart := int (first $np) -}}
{{- $npEnd := int (last $np) -}}
{{- range .Values.pools -}}
{{- $parts := splitList "-" (toString .) -}}
{{- $start := int (first $parts) -}}
{{- $end := int (last $parts) -}}
{{- if or (lt $start 1) (gt $end 65535) (gt $start $end) (gt (len $parts) 2) -}}
{{- fail (printf "pools: %q is not a range START-END within 1-65535" .) -}}
{{- end -}}
{{- if lt $start 1024 -}}
{{- fail (printf "pools: %q reaches below 1024: privileged ports are only ever held by exact reservations (spec.ports), never handed out from the pool" .) -}}
{{- end -}}
{{- if and (le $start $npEnd) (ge $end $npStart) -}}
{{- fail (printf "pools: %q overlaps the NodePort range %s: kube-proxy owns those ports on every node" . .Values.cluster.nodePortRange) -}}
{{- end -}}
{{- end -}}
{{- join "," .Values.pools -}}
{{- end -}}

{{/* Environment shared by the node daemon and its uninstall Job. */}}
{{- define "portslice.nodeEnv" -}}
- name: PORTSLICE_LOG
  value: {{ .Values.logLevel | quote }}
- name: PORTSLICE_UPLINK
  value: {{ .Values.node.uplink | default "auto" | quote }}
{{- /* The node addresses slice pods share: every family the kubelet reports (status.hostIPs is
"IPv4,IPv6" on a dual-stack node, one address on a single-stack one), or the fixed list. The
primary one (status.hostIP) is where the daemon's own server listens. */}}
- name: PORTSLICE_NODE_IP
{{- if eq .Values.node.ipDetection "hostIP" }}
  valueFrom:
    fieldRef: {fieldPath: status.hostIPs}
- name: PORTSLICE_HOST_IP
  valueFrom:
    fieldRef: {fieldPath: status.hostIP}
{{- else if eq .Values.node.ipDetection "fixed" }}
  value: {{ required "node.ip is required when node.ipDetection is fixed" .Values.node.ip | quote }}
- name: PORTSLICE_HOST_IP
  value: {{ splitList "," .Values.node.ip | first | trim | quote }}
{{- else }}
{{- fail "node.ipDetection must be hostIP or fixed" }}
{{- end }}
- name: PORTSLICE_NODE_NAME
  valueFrom:
    fieldRef: {fieldPath: spec.nodeName}
- name: PORTSLICE_POOL
  value: {{ include "portslice.pool" . | quote }}
- name: PORTSLICE_NODE_PORT_RANGE
  value: {{ .Values.cluster.nodePortRange | quote }}
- name: PORTSLICE_PIN_ROOT
  value: {{ .Values.node.pinRoot | quote }}
- name: PORTSLICE_API_SERVER_PORT
  value: {{ .Values.cluster.apiServerPort | quote }}
{{- /* The daemon's metrics and health server: on the node address by default (the kubelet probes
it there, Prometheus scrapes it there), never 0.0.0.0. */}}
- name: PORTSLICE_METRICS_ADDR
  value: {{ include "portslice.metricsAddr" . | quote }}
- name: PORTSLICE_STATE_DIR
  value: /run/portslice
- name: PORTSLICE_TCPMUX
  value: {{ .Values.node.tcpmux.enabled | quote }}
{{- with .Values.cluster.podCIDRs }}
- name: PORTSLICE_POD_CIDRS
  value: {{ join "," . | quote }}
{{- end }}
{{- with .Values.cluster.serviceCIDRs }}
- name: PORTSLICE_SERVICE_CIDRS
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/* Flags shared by the node daemon and its uninstall Job. The CNI dirs are mounted at their
host paths, so paths the daemon writes into the conflist (kubeconfig) are valid on the host. */}}
{{- define "portslice.nodeDirArgs" -}}
- --cni-bin-dir={{ .Values.node.cniBinDir }}
- --cni-conf-dir={{ .Values.node.cniConfDir }}
- --kubeconfig-out={{ .Values.node.cniConfDir }}/portslice.kubeconfig
{{- end -}}

{{/* Host mounts shared by the node daemon and its uninstall Job. */}}
{{- define "portslice.nodeMounts" -}}
- {name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: Bidirectional}
- {name: state, mountPath: /run/portslice}
- {name: cni-bin, mountPath: {{ .Values.node.cniBinDir }}}
- {name: cni-conf, mountPath: {{ .Values.node.cniConfDir }}}
{{- end -}}

{{- define "portslice.nodeVolumes" -}}
- name: bpffs
  hostPath: {path: /sys/fs/bpf, type: DirectoryOrCreate}
- name: state
  hostPath: {path: /run/portslice, type: DirectoryOrCreate}
- name: cni-bin
  hostPath: {path: {{ .Values.node.cniBinDir }}, type: DirectoryOrCreate}
- name: cni-conf
  hostPath: {path: {{ .Values.node.cniConfDir }}, type: DirectoryOrCreate}
{{- end -}}

{{/* The node's own ports as [start, end] pairs with their owner, the list of
crds/ports/src/critical.rs (NodeCritical::new): never held by a slice. */}}
{{- define "portslice.criticalPorts" -}}
{{- $np := splitList "-" (toString .Values.cluster.nodePortRange) -}}
{{- $ports := list (list 22 22 "sshd") (list 2379 2380 "etcd") (list (int .Values.cluster.apiServerPort) (int .Values.cluster.apiServerPort) "the Kubernetes API server") (list 10249 10249 "kube-proxy's metrics") (list 10250 10250 "the kubelet") (list 10255 10255 "the kubelet's read-only port") (list 10256 10256 "kube-proxy's health check") (list (int (first $np)) (int (last $np)) "the NodePort range (kube-proxy)") (list (int .Values.node.metricsPort) (int .Values.node.metricsPort) "the PortSlice node daemon") -}}
{{- if .Values.node.tcpmux.enabled }}{{- $ports = append $ports (list 1 1 "TCPMUX (the PortSlice node daemon)") }}{{- end }}
{{- toJson $ports -}}
{{- end -}}

{{/* The node daemon's own ports, for the operator's and the plugin's node-critical list. */}}
{{- define "portslice.daemonPorts" -}}
{{- .Values.node.metricsPort }}{{ if .Values.node.tcpmux.enabled }},1{{ end }}
{{- end -}}

{{/* host:port of the node daemon's metrics server: IPv6 hosts in brackets. */}}
{{- define "portslice.metricsAddr" -}}
{{- $host := .Values.node.metricsHost | default "$(PORTSLICE_HOST_IP)" -}}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) -}}
[{{ $host }}]:{{ .Values.node.metricsPort }}
{{- else -}}
{{ $host }}:{{ .Values.node.metricsPort }}
{{- end -}}
{{- end -}}
