//! `net.ipv4.ip_local_reserved_ports` of the node (the calling thread's netns): the pool while
//! the daemon runs, and a running slice pod's ports outside the pool (exact reservations such as
//! 5060-5061), so the host never picks one as an ephemeral port (matrix row 10). What was there
//! before install is recorded once and put back exactly at uninstall.
use std::path::Path;

use anyhow::Context as _;
use portslice_ports::{PortRangeError, RangeSet};

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `current` with `ports` added; what was reserved before stays reserved.
pub fn with(current: &str, ports: &RangeSet) -> Result<String, PortRangeError> {
    Ok(current.parse::<RangeSet>()?.union(ports).to_string())
}

/// `current` with `ports` taken out.
pub fn without(current: &str, ports: &RangeSet) -> Result<String, PortRangeError> {
    Ok(current.parse::<RangeSet>()?.subtract(ports).to_string())
}

pub fn read() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(RESERVED)
        .context("reading ip_local_reserved_ports")?
        .trim()
        .to_string())
}

pub fn write(value: &str) -> anyhow::Result<()> {
    // An empty write is refused by some kernels; "\n" clears the list.
    let value = if value.is_empty() { "\n" } else { value };
    std::fs::write(RESERVED, value)
        .with_context(|| format!("setting ip_local_reserved_ports={}", value.trim()))
}

/// Adds `ports` (a no-op when they are reserved already).
pub fn reserve(ports: &RangeSet) -> anyhow::Result<()> {
    let cur = read()?;
    let new = with(&cur, ports).with_context(|| format!("ip_local_reserved_ports is {cur:?}"))?;
    if new != cur {
        write(&new)?;
    }
    Ok(())
}

/// Takes `ports` out again.
pub fn release(ports: &RangeSet) -> anyhow::Result<()> {
    let cur = read()?;
    let new =
        without(&cur, ports).with_context(|| format!("ip_local_reserved_ports is {cur:?}"))?;
    if new != cur {
        write(&new)?;
    }
    Ok(())
}

/// Records the value found before the first install in `file`, unless a record exists (a
/// restarted daemon must not record its own additions as "before").
pub fn record_original(file: &Path) -> anyhow::Result<()> {
    if file.exists() {
        return Ok(());
    }
    let cur = read()?;
    crate::daemon::install::write_atomic(file, cur.as_bytes(), 0o600)
        .with_context(|| format!("recording ip_local_reserved_ports in {}", file.display()))
}

/// Puts back the value recorded by [`record_original`] and removes the record; without a record,
/// takes `fallback` out instead.
pub fn restore_original(file: &Path, fallback: &RangeSet) -> anyhow::Result<()> {
    match std::fs::read_to_string(file) {
        Ok(original) => {
            write(original.trim())?;
            std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => release(fallback),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(s: &str) -> RangeSet {
        s.parse().unwrap()
    }

    #[test]
    fn adding_keeps_what_was_there() {
        assert_eq!(with("", &set("40000-49999")).unwrap(), "40000-49999");
        assert_eq!(
            with("22,40000-40010", &set("40005-50000")).unwrap(),
            "22,40000-50000"
        );
        assert_eq!(with("39999", &set("40000-40001")).unwrap(), "39999-40001");
        assert!(with("garbage", &set("1")).is_err());
    }

    #[test]
    fn taking_out_takes_only_those_ports() {
        assert_eq!(
            without("22,40000-50000", &set("40000-49999")).unwrap(),
            "22,50000"
        );
        assert_eq!(without("40000-49999", &set("40000-49999")).unwrap(), "");
        assert_eq!(without("1-10", &set("4-5")).unwrap(), "1-3,6-10");
    }

    proptest! {
        #[test]
        fn with_then_without_restores_unrelated(start in 40000u16..41000, len in 0u16..100) {
            let pool = RangeSet::new([portslice_ports::PortRange { start, end: start + len }]);
            let added = with("22,8080", &pool).unwrap();
            prop_assert_eq!(without(&added, &pool).unwrap(), "22,8080");
        }
    }
}
