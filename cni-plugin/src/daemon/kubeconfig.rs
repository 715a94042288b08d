//! The kubeconfig the CNI plugin reads: rendered from the daemon's in-cluster service account.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Renders a kubeconfig pointing at `server` with a CA file and a bearer token.
pub fn render(server: &str, ca_file: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca_file}\nusers:\n- name: portslice-cni\n  user:\n    token: \"{token}\"\ncontexts:\n- name: portslice-cni\n  context:\n    cluster: local\n    user: portslice-cni\ncurrent-context: portslice-cni\n"
    )
}

/// The kubeconfig for the in-cluster service account, if we run in a pod.
pub fn in_cluster() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let token = std::fs::read_to_string(format!("{SA_DIR}/token")).ok()?;
    let server = if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    };
    Some(render(&server, &format!("{SA_DIR}/ca.crt"), token.trim()))
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
}
