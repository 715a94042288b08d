//! The CNI environment (`CNI_COMMAND`, `CNI_CONTAINERID`, ...) read into a typed request.
//! Pure: takes a lookup function so tests need no process environment.

use std::collections::BTreeMap;

use super::error::{CniError, code};

/// The verb the runtime asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }

    pub fn parse(text: &str) -> Result<Self, CniError> {
        Ok(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                    ),
                ));
            }
        })
    }
}

/// Everything the environment says about one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Empty for VERSION, STATUS and GC.
    pub container_id: String,
    /// Path of the pod's network namespace; may be empty for DEL (the netns can be gone).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// Reads and validates the environment for the verb in `CNI_COMMAND`. Requirements follow
    /// the spec (and libcni's skel): container id and ifname for ADD/CHECK/DEL, the netns path
    /// for ADD/CHECK only, since DEL must work when the netns is already gone.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND") {
            Some(c) if !c.is_empty() => Command::parse(&c)?,
            _ => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let required = |name: &str, needed: bool| -> Result<String, CniError> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if needed => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} must be set for CNI_COMMAND={}", command.as_str()),
                )),
                _ => Ok(String::new()),
            }
        };
        let container_id = required("CNI_CONTAINERID", needs_container)?;
        if needs_container {
            validate_container_id(&container_id)?;
        }
        let netns = required("CNI_NETNS", needs_netns)?;
        let ifname = required("CNI_IFNAME", needs_container)?;
        if needs_container {
            validate_ifname(&ifname)?;
        }
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (e.g. `IgnoreUnknown=1;K8S_POD_NAME=web`).
/// A key given twice is refused: which one a reader takes is anyone's guess, and
/// `PORTSLICE_RANGE=41000-41099;PORTSLICE_RANGE=1-2` must not sneak a second range past a check.
pub fn parse_cni_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                if out.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS gives {k} more than once"),
                    ));
                }
            }
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS has {pair:?}, which is not a KEY=VALUE pair"),
                ));
            }
        }
    }
    Ok(out)
}

/// The spec: a container id is non-empty and made of alphanumerics, `_`, `.` and `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} must be alphanumerics, '_', '.' or '-'"),
        ))
    }
}

/// Linux interface names: at most 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn a_repeated_cni_args_key_is_refused() {
        let e = parse_cni_args("PORTSLICE_RANGE=41000-41099;PORTSLICE_RANGE=1-2").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(
            e.msg.contains("PORTSLICE_RANGE more than once"),
            "{}",
            e.msg
        );
        assert_eq!(parse_cni_args("A=1;B=2").unwrap().len(), 2);
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ];
        let e = env(&full).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args["K8S_POD_NAME"], "web");
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let partial: Vec<_> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = env(&partial).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{missing}");
            assert!(err.msg.contains(missing), "{}", err.msg);
        }
    }

    #[test]
    fn del_works_without_a_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(e.unwrap().netns, "");
    }

    #[test]
    fn version_status_gc_need_nothing_else() {
        for verb in ["VERSION", "STATUS", "GC"] {
            assert!(env(&[("CNI_COMMAND", verb)]).is_ok(), "{verb}");
        }
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            env(&[("CNI_COMMAND", "UP")]).unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn bad_container_ids_ifnames_and_args_are_code_4() {
        let base = |id: &'static str, ifname: &'static str, args: &'static str| {
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
            ])
        };
        assert_eq!(base("a/b", "eth0", "").unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            base("abc", "a-very-long-ifname0", "").unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            base("abc", "eth0", "novalue").unwrap_err().code,
            code::INVALID_ENV
        );
        assert!(base("abc", "eth0", ";A=1;;B=").is_ok());
    }
}
