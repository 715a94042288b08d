//! The node's verb lock: an exclusive `flock` on the pin root directory, held for a whole CNI
//! ADD or DEL (and a daemon reconcile pass). Without it two pods of one slice landing together
//! could both pass the one-sliver check, and deleting one could strip the other's steering.
//! Kernel-held: a crashed holder never leaves it taken.
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening {path} to lock it: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another PortSlice CNI call held the node lock on {path} for over {waited:?}")]
    Busy { path: String, waited: Duration },
}

/// Held until dropped.
pub struct NodeLock {
    _flock: Flock<File>,
}

impl NodeLock {
    /// Waits up to `timeout` for the lock on `pin_root`.
    pub fn acquire(pin_root: &Path, timeout: Duration) -> Result<Self, LockError> {
        let shown = pin_root.display().to_string();
        let deadline = Instant::now() + timeout;
        let mut file = File::open(pin_root).map_err(|source| LockError::Open {
            path: shown.clone(),
            source,
        })?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(Self { _flock: flock }),
                Err((back, _)) => file = back,
            }
            if Instant::now() >= deadline {
                return Err(LockError::Busy {
                    path: shown,
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_then_times_out() {
        let dir = std::env::temp_dir().join(format!("portslice-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = NodeLock::acquire(&dir, Duration::from_millis(100)).unwrap();
        let busy = NodeLock::acquire(&dir, Duration::from_millis(50));
        assert!(matches!(busy, Err(LockError::Busy { .. })));
        drop(first);
        assert!(NodeLock::acquire(&dir, Duration::from_millis(100)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
