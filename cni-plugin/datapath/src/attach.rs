//! Attaching a TC program to an interface's ingress so that it outlives this process.
//!
//! Two real alternatives, hence the enum: tcx links (kernel 6.6+), pinned in bpffs so they stay
//! attached after the short-lived CNI process exits and are detached by removing the pin; and the
//! classic clsact qdisc + direct-action filter for older kernels, where the kernel keeps the
//! filter by itself and we find it again by a fixed priority/handle.
use std::{io, path::Path};

use aya::programs::ProgramError;
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use aya::sys::SyscallError;
use aya::util::KernelVersion;

use super::DatapathError;

/// The kernel refused a tcx attach because the program is still attached there (EEXIST).
fn still_attached(e: &ProgramError) -> bool {
    matches!(e, ProgramError::SyscallError(SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(libc::EEXIST))
}

/// Priority and handle of our clsact filters: fixed so a later process can find and remove them.
const CLSACT_PRIORITY: u16 = 0x5053; // "PS"
const CLSACT_HANDLE: TcHandle = TcHandle::new(0x5053, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx bpf_link, pinned under `<pin root>/links/`.
    Tcx,
    /// clsact qdisc with a direct-action filter (kernels before 6.6).
    Clsact,
}

impl AttachMode {
    /// tcx where the kernel has it. `PORTSLICE_ATTACH_MODE=clsact|tcx` overrides (tests, old
    /// kernels with backports); the CNI process and the daemon decide the same way.
    pub fn detect() -> Self {
        match std::env::var("PORTSLICE_ATTACH_MODE").as_deref() {
            Ok("clsact") => return Self::Clsact,
            Ok("tcx") => return Self::Tcx,
            _ => {}
        }
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Clsact,
        }
    }

    /// The name of the link step in [`crate::StepTimes`].
    pub fn link_step(self) -> &'static str {
        match self {
            Self::Tcx => "tcx link",
            Self::Clsact => "clsact filter",
        }
    }

    /// Attaches `prog` to `ifname` ingress. With tcx, an existing pinned link at `link_pin` is
    /// atomically switched to `prog` (no traffic gap on daemon upgrade); otherwise a new link is
    /// created and pinned there. With clsact, our filter is replaced in place the same way
    /// (`link_pin` is unused: the kernel keeps the filter).
    pub fn attach(
        self,
        prog: &mut SchedClassifier,
        ifname: &str,
        link_pin: &Path,
    ) -> Result<(), DatapathError> {
        let err = |what: &str, e: &dyn std::error::Error| DatapathError::Attach {
            ifname: ifname.to_string(),
            detail: format!("{what}: {}", super::loader::chain(e)),
        };
        match self {
            Self::Tcx => {
                let id = match PinnedLink::from_pin(link_pin) {
                    Ok(old) => {
                        let link = SchedClassifierLink::try_from(FdLink::from(old))
                            .map_err(|e| err("reusing pinned link", &e))?;
                        prog.attach_to_link(link)
                            .map_err(|e| err("replacing program", &e))?
                    }
                    Err(_) => {
                        // A link we just released may still be on its way out (its last
                        // reference can be bpffs's, dropped after a grace period): the kernel
                        // then refuses the program as attached (EEXIST). Wait for it, bounded.
                        let mut tries = 0;
                        loop {
                            match prog.attach_with_options(
                                ifname,
                                TcAttachType::Ingress,
                                TcAttachOptions::TcxOrder(LinkOrder::default()),
                            ) {
                                Ok(id) => break id,
                                Err(e) if tries < 50 && still_attached(&e) => {
                                    tries += 1;
                                    std::thread::sleep(std::time::Duration::from_millis(5));
                                }
                                Err(e) => return Err(err("tcx attach", &e)),
                            }
                        }
                    }
                };
                let link = prog.take_link(id).map_err(|e| err("taking link", &e))?;
                let fd: FdLink = link.try_into().map_err(|e| err("tcx link", &e))?;
                if !link_pin.exists() {
                    fd.pin(link_pin).map_err(|e| err("pinning link", &e))?;
                }
                // Dropping our fd leaves the link attached: the pin holds it.
                Ok(())
            }
            Self::Clsact => {
                if let Err(e) = tc::qdisc_add_clsact(ifname) {
                    // "exists" is ambiguous (an `ingress` qdisc may be there): the attach below
                    // fails clearly if it is not a clsact.
                    tracing::debug!(ifname, error = %e, "clsact qdisc not added");
                }
                // Replace in place first: RTM_NEWTFILTER for our priority/handle without
                // NLM_F_CREATE swaps the program of the existing filter (cls_bpf "change"), so
                // a restart or upgrade never leaves the interface without one. Detaching and
                // attaching again would send what arrives in between to the host stack (a
                // reset for TCP, port unreachable for UDP). Only when there is no filter yet
                // (the kernel says ENOENT) is one created.
                let existing = SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Ingress,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .map_err(|e| err("naming the filter", &e))?;
                let id = match prog.attach_to_link(existing) {
                    Ok(id) => id,
                    Err(replace) => {
                        tracing::debug!(ifname, error = %super::loader::chain(&replace), "no filter to replace; creating it");
                        prog.attach_with_options(
                            ifname,
                            TcAttachType::Ingress,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: CLSACT_PRIORITY,
                                handle: CLSACT_HANDLE,
                                ..Default::default()
                            }),
                        )
                        .map_err(|e| err("clsact attach", &e))?
                    }
                };
                let link = prog.take_link(id).map_err(|e| err("taking link", &e))?;
                // The filter lives in the kernel; dropping the handle would remove it.
                std::mem::forget(link);
                Ok(())
            }
        }
    }

    /// Detaches what [`AttachMode::attach`] attached. Nothing there is not an error.
    pub fn detach(self, ifname: &str, link_pin: &Path) -> Result<(), DatapathError> {
        match self {
            // Removing the pin, the link's last reference, detaches it: we open the link and
            // close it ourselves, so it is gone when DEL returns. A tcx release waits for an
            // RCU grace period under RTNL (about 10 ms here), and only removing the file would
            // leave that to a kernel work queue; but then a quick re-attach to the same veth (a
            // retried ADD after a failed one undid itself) finds the program still attached
            // and fails with EEXIST (the benchmark caught that). Even so the last reference can
            // be bpffs's, dropped after a grace period: attach waits for that (bounded).
            Self::Tcx => match PinnedLink::from_pin(link_pin) {
                Ok(link) => link.unpin().map(drop).map_err(|e| DatapathError::Io {
                    what: format!("unpinning {}", link_pin.display()),
                    source: e,
                }),
                Err(_) => match std::fs::remove_file(link_pin) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Io {
                        what: format!("removing {}", link_pin.display()),
                        source: e,
                    }),
                    _ => Ok(()),
                },
            },
            Self::Clsact => {
                // Dropping a link handle for our fixed priority/handle removes the filter.
                if let Ok(link) = SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Ingress,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                ) {
                    drop(link);
                }
                Ok(())
            }
        }
    }

    /// Whether something we attached is there.
    pub fn is_attached(self, ifname: &str, link_pin: &Path) -> bool {
        match self {
            Self::Tcx => PinnedLink::from_pin(link_pin).is_ok(),
            // aya cannot list netlink filters; the kernel keeps them without us, so trust it.
            Self::Clsact => {
                let _ = ifname;
                true
            }
        }
    }
}
