//! Runs of the port table in one bpf(2) call each (`BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_UPDATE_BATCH`, Linux 5.6+). A slice's ports are one contiguous run of keys per
//! protocol (`proto * 65536 + port`), so attaching or detaching a 10,000-port slice is four
//! calls instead of 40,000, and ADD no longer grows with the slice's size. aya has no batch
//! operations, so this is the one place that speaks bpf(2) itself; a kernel that refuses them
//! gets `None`, and the caller does what it did before, one key at a time.
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;

use super::abi;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Batch access to the pinned `port_owner` array.
pub(crate) struct PortRuns {
    map: MapData,
}

impl PortRuns {
    pub(crate) fn new(map: MapData) -> Self {
        Self { map }
    }

    fn call(&self, cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
        attr.map_fd = self.map.fd().as_fd().as_raw_fd() as u32;
        // SAFETY: bpf(2) reads `attr` (the size we pass) and the buffers it points at, which
        // the callers keep alive and size to `count` elements of the map's key and value size.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The owners of keys `first..=last`; `Ok(None)` when the kernel has no batch operations.
    pub(crate) fn read(&self, first: u32, last: u32) -> io::Result<Option<Vec<abi::PortOwner>>> {
        let n = (last - first + 1) as usize;
        let mut keys = vec![0u32; n];
        let mut values = vec![abi::PortOwner::default(); n];
        let mut got = 0usize;
        // The batch starts after `in_batch` (absent: at key 0), and its cursor comes back in
        // `out_batch` for the next call.
        let mut cursor: u32 = first.wrapping_sub(1);
        let mut next: u32 = 0;
        while got < n {
            let mut attr = BatchAttr {
                in_batch: if first == 0 && got == 0 {
                    0
                } else {
                    &cursor as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys[got..].as_mut_ptr() as u64,
                values: values[got..].as_mut_ptr() as u64,
                count: (n - got) as u32,
                ..BatchAttr::default()
            };
            match self.call(BPF_MAP_LOOKUP_BATCH, &mut attr) {
                Ok(()) => {}
                // The end of the map: what came back is all there is.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    got += attr.count as usize;
                    break;
                }
                Err(e) if unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
            if attr.count == 0 {
                break;
            }
            got += attr.count as usize;
            cursor = next;
        }
        if got != n || keys.iter().enumerate().any(|(i, k)| *k != first + i as u32) {
            return Err(io::Error::other(format!(
                "batch lookup of port keys {first}-{last} returned {got} of {n} in order"
            )));
        }
        Ok(Some(values))
    }

    /// Writes `values[i]` at key `first + i`; `Ok(false)` when the kernel has no batch
    /// operations (nothing was written).
    pub(crate) fn write(&self, first: u32, values: &[abi::PortOwner]) -> io::Result<bool> {
        let keys: Vec<u32> = (0..values.len() as u32).map(|i| first + i).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: values.len() as u32,
            ..BatchAttr::default()
        };
        match self.call(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) if attr.count as usize == values.len() => Ok(true),
            Ok(()) => Err(io::Error::other(format!(
                "batch update of port keys from {first} wrote {} of {}",
                attr.count,
                values.len()
            ))),
            // Before the first element is written the kernel refuses the command as a whole.
            Err(e) if unsupported(&e) && attr.count == 0 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The kernel's "no such command or no batch ops for this map": EINVAL, EOPNOTSUPP, ENOSYS, or
/// its internal ENOTSUPP (524), which bpf(2) lets through.
fn unsupported(e: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// The contiguous runs of port-table keys of a range: one per protocol, TCP first.
pub(crate) fn runs(lo: u16, hi: u16, tcp: bool, udp: bool) -> Vec<(u32, u32)> {
    [(true, tcp), (false, udp)]
        .into_iter()
        .filter(|(_, on)| *on && lo <= hi)
        .map(|(t, _)| (abi::port_key(t, lo), abi::port_key(t, hi)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_one_contiguous_span_per_protocol() {
        assert_eq!(
            runs(40000, 40009, true, true),
            [
                (abi::port_key(true, 40000), abi::port_key(true, 40009)),
                (abi::port_key(false, 40000), abi::port_key(false, 40009))
            ]
        );
        assert_eq!(runs(5060, 5060, false, true).len(), 1);
        assert!(runs(10, 9, true, true).is_empty());
        assert_eq!(std::mem::size_of::<BatchAttr>(), 56);
    }
}
