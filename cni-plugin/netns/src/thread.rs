//! Running a closure inside another network namespace on a dedicated OS thread.

use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use super::NetnsError;

/// Runs `f` on a fresh OS thread that entered the netns at `path`. The thread ends afterwards, so
/// no thread of this process ever goes back into the pool in the wrong netns.
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetnsError> + Send + 'static,
{
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => NetnsError::Gone(shown.clone()),
        _ => NetnsError::Enter {
            path: shown.clone(),
            source,
        },
    })?;
    let handle = std::thread::Builder::new()
        .name("portslice-netns".into())
        .spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
                path: shown,
                source: std::io::Error::from(e),
            })?;
            drop(file);
            f()
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| NetnsError::Thread("it panicked".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_netns_is_reported_as_gone() {
        let r = in_netns(Path::new("/run/netns/portslice-does-not-exist"), || Ok(()));
        assert!(matches!(r, Err(NetnsError::Gone(_))), "{r:?}");
    }

    #[test]
    fn a_file_that_is_no_netns_cannot_be_entered() {
        // setns(2) refuses a regular file: DEL treats this like a gone netns.
        let r = in_netns(Path::new("/proc/self/status"), || Ok(()));
        assert!(matches!(r, Err(NetnsError::Enter { .. })), "{r:?}");
    }
}
