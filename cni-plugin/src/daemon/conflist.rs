//! Pure editing of the node's CNI conflist: append our plugin to the chain and take it out
//! again, the way the Istio and Linkerd CNI installers do. Idempotent both ways; everything else
//! in the file (other plugins, unknown keys) is kept as it was.
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConflistError {
    #[error("CNI config is not valid JSON: {0}")]
    Json(String),
    #[error("CNI config has neither a \"plugins\" list nor a \"type\": not a CNI config")]
    NotCni,
}

/// Parses a `.conflist`, or a single-plugin `.conf` which is turned into a conflist (libcni
/// accepts both; a chain needs the list form).
pub fn parse(text: &str) -> Result<Map<String, Value>, ConflistError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ConflistError::Json(e.to_string()))?;
    let Value::Object(mut obj) = v else {
        return Err(ConflistError::NotCni);
    };
    if matches!(obj.get("plugins"), Some(Value::Array(_))) {
        return Ok(obj);
    }
    if !obj.contains_key("type") {
        return Err(ConflistError::NotCni);
    }
    // .conf -> .conflist: name/cniVersion stay on top, the rest becomes the first plugin.
    let mut list = Map::new();
    for k in ["cniVersion", "name"] {
        if let Some(v) = obj.remove(k) {
            list.insert(k.to_string(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(obj)]));
    Ok(list)
}

fn plugins(list: &mut Map<String, Value>) -> &mut Vec<Value> {
    if !matches!(list.get("plugins"), Some(Value::Array(_))) {
        list.insert("plugins".into(), Value::Array(Vec::new()));
    }
    match list.get_mut("plugins") {
        Some(Value::Array(a)) => a,
        _ => unreachable!("plugins was just made an array"),
    }
}

fn is_ours(p: &Value, plugin_type: &str) -> bool {
    p.get("type").and_then(Value::as_str) == Some(plugin_type)
}

/// Appends `plugin` (whose `type` names us) at the end of the chain, or replaces our existing
/// entry in place. Returns whether anything changed.
pub fn add_plugin(list: &mut Map<String, Value>, plugin: &Value) -> bool {
    let Some(t) = plugin.get("type").and_then(Value::as_str) else {
        return false;
    };
    let t = t.to_string();
    let ps = plugins(list);
    if let Some(existing) = ps.iter_mut().find(|p| is_ours(p, &t)) {
        if existing == plugin {
            return false;
        }
        *existing = plugin.clone();
        return true;
    }
    ps.push(plugin.clone());
    true
}

/// Removes every entry of type `plugin_type`. Returns whether anything changed.
pub fn remove_plugin(list: &mut Map<String, Value>, plugin_type: &str) -> bool {
    let ps = plugins(list);
    let before = ps.len();
    ps.retain(|p| !is_ours(p, plugin_type));
    before != ps.len()
}

/// What the daemon found in the conflist it joins: logged when it changes and exported as
/// `portslice_cni_conflist_info`, so "which CNI does this node run, at which version, and are we
/// in its chain" is one query away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// File name in the CNI conf dir.
    pub file: String,
    /// The conflist's `cniVersion` (empty when it has none).
    pub cni_version: String,
    /// Plugin types in chain order.
    pub plugins: Vec<String>,
    /// Whether we speak that version; when not, plain pods pass through and slice pods fail.
    pub version_supported: bool,
}

/// Reads the facts of [`ChainReport`] from a parsed conflist.
pub fn inspect(file: &str, list: &Map<String, Value>) -> ChainReport {
    let cni_version = list
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    ChainReport {
        file: file.to_string(),
        version_supported: crate::cni::version::Version::parse(&cni_version).is_ok(),
        cni_version,
        plugins,
    }
}

/// Serializes like the files runtimes write (pretty, trailing newline).
pub fn render(list: &Map<String, Value>) -> String {
    let mut s = serde_json::to_string_pretty(list).unwrap_or_default();
    s.push('\n');
    s
}

/// Which file of a CNI conf dir the runtime uses: the first `.conflist`/`.conf`/`.json` in
/// lexical order (libcni's rule), skipping our own backups.
pub fn pick_file(mut names: Vec<String>) -> Option<String> {
    names.sort();
    names.into_iter().find(|n| {
        (n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
            && !n.starts_with('.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PTP: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn ours() -> Value {
        json!({"type": "portslice", "pinRoot": "/sys/fs/bpf/portslice"})
    }

    #[test]
    fn appends_once_and_keeps_the_rest() {
        let mut l = parse(PTP).unwrap();
        assert!(add_plugin(&mut l, &ours()));
        assert!(!add_plugin(&mut l, &ours()), "second add is a no-op");
        let ps = l["plugins"].as_array().unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[2]["type"], "portslice");
        assert_eq!(ps[0]["ipam"]["type"], "host-local");
    }

    #[test]
    fn replaces_a_changed_entry_in_place() {
        let mut l = parse(PTP).unwrap();
        add_plugin(&mut l, &ours());
        let newer = json!({"type": "portslice", "pinRoot": "/other"});
        assert!(add_plugin(&mut l, &newer));
        assert_eq!(l["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(l["plugins"][2]["pinRoot"], "/other");
    }

    #[test]
    fn remove_undoes_add_exactly() {
        let orig = parse(PTP).unwrap();
        let mut l = orig.clone();
        add_plugin(&mut l, &ours());
        assert!(remove_plugin(&mut l, "portslice"));
        assert!(!remove_plugin(&mut l, "portslice"));
        assert_eq!(l, orig);
    }

    #[test]
    fn single_plugin_conf_becomes_a_list() {
        let l =
            parse(r#"{"cniVersion":"0.4.0","name":"n","type":"bridge","bridge":"cni0"}"#).unwrap();
        assert_eq!(l["name"], "n");
        assert_eq!(l["plugins"][0]["type"], "bridge");
        assert_eq!(l["plugins"][0]["bridge"], "cni0");
        assert!(l["plugins"][0].get("name").is_none());
    }

    #[test]
    fn inspect_reports_version_chain_and_support() {
        let kindnet = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp"},{"type":"portmap"}]}"#;
        let mut l = parse(kindnet).unwrap();
        add_plugin(&mut l, &ours());
        let r = inspect("10-kindnet.conflist", &l);
        assert_eq!(r.cni_version, "0.3.1");
        assert_eq!(r.plugins, ["ptp", "portmap", "portslice"]);
        assert!(r.version_supported);
        let future = parse(r#"{"cniVersion":"2.0.0","plugins":[{"type":"x"}]}"#).unwrap();
        assert!(!inspect("f", &future).version_supported);
        let bare = parse(r#"{"plugins":[{}]}"#).unwrap();
        let r = inspect("f", &bare);
        assert_eq!(
            (r.cni_version.as_str(), r.plugins.as_slice()),
            ("", &["?".to_string()][..])
        );
        assert!(!r.version_supported);
    }

    #[test]
    fn rejects_non_cni() {
        assert!(matches!(parse("[1]"), Err(ConflistError::NotCni)));
        assert!(matches!(parse("{"), Err(ConflistError::Json(_))));
        assert!(matches!(parse("{\"a\":1}"), Err(ConflistError::NotCni)));
    }

    #[test]
    fn picks_first_config_like_libcni() {
        let f = pick_file(vec![
            "20-b.conflist".into(),
            "10-a.conf".into(),
            "README".into(),
            ".x.conflist".into(),
        ]);
        assert_eq!(f.as_deref(), Some("10-a.conf"));
        assert_eq!(pick_file(vec!["README".into()]), None);
    }
}
