//! What the agent answers: one line `<name> <peer-ip>:<peer-port>`.
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Who answered (pod name, or the remote host's name).
    pub name: String,
    /// The address the answering side saw the caller at.
    pub peer: SocketAddr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unexpected agent answer {0:?}")]
pub struct BadAnswer(pub String);

pub fn parse_answer(text: &str) -> Result<Answer, BadAnswer> {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|p| p.parse().ok()), it.next()) {
        (Some(name), Some(peer), None) => Ok(Answer {
            name: name.to_string(),
            peer,
        }),
        _ => Err(BadAnswer(text.to_string())),
    }
}

/// Parses `kubectl get portslices` output into (name, range, slivers) rows by column header.
pub fn parse_get_portslices(text: &str) -> Vec<(String, String, String)> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split_whitespace().collect();
    let idx = |c: &str| cols.iter().position(|h| *h == c);
    let (Some(n), Some(r), Some(s)) = (idx("NAME"), idx("RANGE"), idx("SLIVERS")) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == cols.len())
        .map(|f| (f[n].to_string(), f[r].to_string(), f[s].to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_answer_line() {
        let a = parse_answer("noise\nweb-1 198.18.0.1:40001\n").unwrap();
        assert_eq!(a.name, "web-1");
        assert_eq!(a.peer, "198.18.0.1:40001".parse().unwrap());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_answer("").is_err());
        assert!(parse_answer("x y z").is_err());
        assert!(parse_answer("x 1.2.3.4").is_err());
    }

    #[test]
    fn reads_portslice_columns_by_header() {
        let out = "NAME   RANGE         SIZE   READY   SLIVERS   AGE\n\
                   game   40000-40009   10     True    1         5s\n\
                   web    <none>        20     False   0         5s\n";
        let rows = parse_get_portslices(out);
        assert_eq!(rows[0], ("game".into(), "40000-40009".into(), "1".into()));
        assert_eq!(rows[1].1, "<none>");
    }
}
