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
    // The plugin runs on the host, where the pod's SA_DIR does not exist: embed the CA itself.
    let ca = std::fs::read(format!("{SA_DIR}/ca.crt")).ok()?;
    Some(render_with_ca_data(&server, &ca, token.trim()))
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
