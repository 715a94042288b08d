//! The kubeconfig the CNI plugin reads: rendered from the daemon's service account token, and
//! rendered again whenever the token changes. The kubelet rotates projected tokens (bound tokens
//! expire); a kubeconfig written once at start would make slice pods' ADD fail with 103 after
//! the token's lifetime.
use anyhow::Context as _;

use super::DaemonArgs;

/// The projected service account token in a pod.
pub const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA in a pod.
pub const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Keeps the CNI plugin's kubeconfig on this daemon's current token.
///
/// It rewrites the file when this process's token changed since it last wrote, or the file is
/// gone, never merely because the file differs: during a rolling update the old daemon still
/// runs for its grace period with a token that dies with its pod, and rewriting on any
/// difference would let it put that token back over the new daemon's.
#[derive(Debug, Default)]
pub struct Follower {
    written: std::sync::Mutex<Option<String>>,
}

impl Follower {
    /// Writes the kubeconfig for the token now in `args.token_file` if it is new to this process.
    /// Without `--kubeconfig-out` nothing is written; without a token or server (not in a
    /// cluster) it warns and writes nothing.
    pub fn refresh(&self, args: &DaemonArgs) -> anyhow::Result<()> {
        let Some(out) = &args.kubeconfig_out else {
            return Ok(());
        };
        let Some(server) = server(args) else {
            tracing::warn!(path = %out.display(), "not in a cluster and no --api-server: no kubeconfig written");
            return Ok(());
        };
        let token = match std::fs::read_to_string(&args.token_file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(token = %args.token_file.display(), error = %e, "no service account token: no kubeconfig written");
                return Ok(());
            }
        };
        let ca = std::fs::read(&args.ca_file)
            .with_context(|| format!("reading the CA {}", args.ca_file.display()))?;
        // The plugin runs on the host, where the pod's secret mount does not exist: embed the CA.
        let text = render_with_ca_data(&server, &ca, token.trim());
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if written.as_deref() == Some(text.as_str()) && out.exists() {
            return Ok(());
        }
        super::install::write_atomic(out, text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", out.display()))?;
        tracing::info!(path = %out.display(), "wrote the CNI plugin's kubeconfig for the current token");
        *written = Some(text);
        Ok(())
    }
}

/// The API server: `--api-server`, else the in-cluster one.
pub fn server(args: &DaemonArgs) -> Option<String> {
    args.api_server.clone().or_else(in_cluster_server)
}

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, in a pod.
fn in_cluster_server() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// Renders a kubeconfig pointing at `server` with a CA file and a bearer token.
pub fn render(server: &str, ca_file: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca_file}\nusers:\n- name: portslice-cni\n  user:\n    token: \"{token}\"\ncontexts:\n- name: portslice-cni\n  context:\n    cluster: local\n    user: portslice-cni\ncurrent-context: portslice-cni\n"
    )
}

/// Like [`render`], with the CA certificate embedded (`certificate-authority-data`).
pub fn render_with_ca_data(server: &str, ca_pem: &[u8], token: &str) -> String {
    render(server, "", token).replace(
        "    certificate-authority: \n",
        &format!("    certificate-authority-data: {}\n", base64(ca_pem)),
    )
}

/// Standard base64 with padding (a kubeconfig's `*-data` fields).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_a_usable_kubeconfig() {
        let k = super::render("https://10.96.0.1:443", "/ca.crt", "tok");
        assert!(k.contains("server: https://10.96.0.1:443"));
        assert!(k.contains("token: \"tok\""));
        assert!(k.contains("current-context: portslice-cni"));
    }

    #[test]
    fn embeds_the_ca_for_the_host_side_plugin() {
        let k = super::render_with_ca_data("https://10.96.0.1:443", b"PEM!", "tok");
        assert!(
            k.contains("    certificate-authority-data: UEVNIQ==\n"),
            "{k}"
        );
        assert!(!k.contains("certificate-authority: "), "{k}");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
        assert_eq!(super::base64(b""), "");
    }
}
