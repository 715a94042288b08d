//! The verbs: ADD, DEL, CHECK, VERSION, STATUS, GC. Each returns what goes to stdout (or
//! nothing) or a [`CniError`] that `main` prints as the spec's error result.

mod add;
mod check;
mod del;
mod gc_status;
mod slice;

use std::path::Path;
use std::time::Duration;

use super::config::{Envelope, PluginConfig, peek_version};
use super::env::{CniEnv, Command};
use super::error::{CniError, code};
use super::timing;
use super::version::version_reply;
use crate::node::lock::{LockError, NodeLock};
use portslice_datapath::{DatapathError, PinnedDatapath};

/// Runs one invocation. `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(env: &CniEnv, stdin: &str) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(
            version_reply(peek_version(stdin).as_deref()).to_string(),
        ));
    }
    let pod = crate::slice_source::PodIdentity::from_args(&env.args).display();
    let span = tracing::info_span!(
        "cni",
        command = env.command.as_str(),
        container_id = %env.container_id,
        pod = %pod
    );
    let _enter = span.enter();
    // ADD and DEL take the raw configuration: whatever is wrong with it, a pod that is not in a
    // slice must come through them unharmed.
    match env.command {
        Command::Add => {
            let envelope = timing::phase("config", || Envelope::parse(stdin))?;
            return add::add(env, &envelope).map(Some);
        }
        Command::Del => return del::del(env, stdin).map(|()| None),
        _ => {}
    }
    let envelope = Envelope::parse(stdin)?;
    let conf = match PluginConfig::from_envelope(&envelope) {
        Ok(conf) => conf,
        // CHECK of a pod that asks for no slice passes whatever is wrong with our config, as ADD
        // passes it through: the runtime would otherwise tear down a pod we have no business with.
        Err(e) if env.command == Command::Check && !asks_for_slice(env, &envelope) => {
            tracing::error!(error = %e, "the configuration cannot be used for slices; CHECK of a pod that asks for none passes");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let out = match env.command {
        Command::Check => check::check(env, &conf),
        Command::Gc => gc_status::gc(&conf),
        Command::Status => gc_status::status(&conf),
        // Answered above; kept total for the match.
        Command::Add | Command::Del | Command::Version => Ok(()),
    };
    out.map(|()| None)
        .map_err(|e| e.in_version(conf.version.as_str()))
}

/// Whether the pod visibly asks for a slice (see [`crate::slice_source::asks_for_slice`]).
fn asks_for_slice(env: &CniEnv, envelope: &Envelope) -> bool {
    crate::slice_source::asks_for_slice(
        &env.args,
        envelope.pod_annotations().as_ref(),
        envelope.has_network_slice(),
    )
}

/// Opens the datapath the daemon pinned, the one way every verb does: `Ok(None)` when nothing is
/// pinned, an error when what is pinned cannot be used.
fn open_datapath(pin_root: &Path) -> Result<Option<PinnedDatapath>, CniError> {
    timing::phase("datapath open", || PinnedDatapath::open_if_loaded(pin_root))
        .map_err(|e| datapath_err("opening the PortSlice datapath failed", e))
}

/// The datapath's own steps of its last attach or detach, into the timings.
fn record_datapath_steps(dp: &PinnedDatapath) {
    for (step, elapsed) in dp.last_steps().iter() {
        timing::record(step, elapsed);
    }
}

fn datapath_err(msg: &str, e: DatapathError) -> CniError {
    let code = match e {
        DatapathError::PortTaken { .. } => code::SLIVER_EXISTS,
        _ => code::DATAPATH,
    };
    CniError::new(code, msg).with_details(e.to_string())
}

fn not_loaded(pin_root: &Path) -> CniError {
    CniError::new(
        code::DATAPATH,
        "the PortSlice datapath is not loaded on this node",
    )
    .with_details(format!(
        "nothing is pinned at {}: is the portslice node daemon running?",
        pin_root.display()
    ))
}

/// How long a verb waits for another on the same node before it gives up with code 11 (the
/// runtime retries). Verbs take milliseconds; this only bounds a stuck one.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The node's verb lock (see [`crate::node::lock`]), held until dropped.
fn lock_node(pin_root: &Path) -> Result<NodeLock, CniError> {
    timing::phase("node lock", || NodeLock::acquire(pin_root, LOCK_WAIT)).map_err(|e| {
        let code = match e {
            LockError::Busy { .. } => code::TRY_AGAIN_LATER,
            LockError::Open { .. } => code::DATAPATH,
        };
        CniError::new(code, "taking the node's PortSlice lock failed").with_details(e.to_string())
    })
}

fn netns_err(msg: &str, e: portslice_netns::NetnsError) -> CniError {
    CniError::new(code::NETNS_SETUP, msg).with_details(e.to_string())
}
