//! One reconcile of one slice: allocate (or keep) its range, report its slivers, and hold a
//! deleted slice's range until its pods are gone and the quarantine has passed.
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use portslice_crds::{FINALIZER, PortSlice, PortSliceStatus, conditions};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::index::{ExactRefusal, SliceId, age_of};
use super::status::{Outcome, StatusInput, current_reason, desired};
use super::{Context, MANAGER, pods, refusals};
use crate::allocator::AllocError;
use crate::metrics::ErrorLabels;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to write the status of PortSlice {slice}: {source}")]
    WriteStatus { slice: String, source: kube::Error },
    #[error("PortSlice {0} has no namespace")]
    NoNamespace(String),
    #[error("finalizer {FINALIZER}: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// Not a failure: the finalizer helper removes the finalizer as soon as cleanup returns Ok,
    /// so a deleted slice that must keep its range returns this, with when to look again.
    #[error("range still held (pods running or quarantine); checking again in {0:?}")]
    Held(Duration),
    #[error("publishing the slice: {0}")]
    Publish(#[source] crate::publish::PublishError),
    /// The leader Lease may have expired (see `leader::Fence`); hand out nothing.
    #[error("not handing out ports: the leader Lease may have expired")]
    Fenced,
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Error::WriteStatus { source, .. } if is_conflict(source) => "conflict",
            Error::WriteStatus { .. } => "write_status",
            Error::NoNamespace(_) => "no_namespace",
            Error::Held(_) => "held",
            Error::Fenced => "fenced",
            Error::Publish(_) => "publish",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.label()
                }
                finalizer::Error::AddFinalizer(_) => "add_finalizer",
                finalizer::Error::RemoveFinalizer(_) => "remove_finalizer",
                _ => "finalizer",
            },
        }
    }
}

fn held(e: &Error) -> Option<Duration> {
    match e {
        Error::Held(d) => Some(*d),
        Error::Finalizer(inner) => match inner.as_ref() {
            finalizer::Error::CleanupFailed(Error::Held(d)) => Some(*d),
            _ => None,
        },
        _ => None,
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[instrument(skip_all, fields(slice = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub async fn reconcile(obj: Arc<PortSlice>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Nothing is decided before the first complete list of slices and pods: the table must
    // reflect every status that holds a range, and a drain check must see every pod.
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let started = Instant::now();
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer::finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(slice) => apply(&slice, &ctx, &api).await,
            Finalizer::Cleanup(slice) => cleanup(&slice, &ctx, &api).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe_reconcile(started.elapsed());
    result
}

pub fn error_policy(obj: Arc<PortSlice>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Some(wait) = held(error) {
        return Action::requeue(wait);
    }
    let label = error.label();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { error: label })
        .inc();
    match label {
        // Our copy was stale; the watch event with the fresh one is on its way.
        "conflict" => return Action::requeue(Duration::from_millis(250)),
        // Either the Lease renewal shows up shortly, or the process exits as it lost the Lease.
        "fenced" => return Action::requeue(Duration::from_secs(1)),
        _ => {}
    }
    warn!(slice = %obj.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// A live slice: keep or allocate its range and report its slivers.
async fn apply(obj: &PortSlice, ctx: &Context, api: &Api<PortSlice>) -> Result<Action, Error> {
    let oref = ObjectRef::from_obj(obj);
    let outcome = decide(obj, ctx);
    match &outcome {
        Outcome::Waiting { reason, .. } => {
            ctx.index().wait(oref);
            ctx.metrics
                .waiting
                .get_or_create(&crate::metrics::OutcomeLabels { reason })
                .inc();
        }
        _ => ctx.index().stop_waiting(&oref),
    }
    let all_pods = ctx.pods.state();
    let members = pods::members(obj, all_pods.iter().map(AsRef::as_ref));
    let slivers = pods::slivers(&members);
    let (node_refusals, refusals_expire) = refusals::current(
        obj,
        ctx.refusals.state().iter().map(AsRef::as_ref),
        &pods::running_on(&members),
        Timestamp::now(),
    );
    let newly_allocated = matches!(outcome, Outcome::Allocated { range } if obj.status.as_ref().and_then(|s| s.range) != Some(range));
    let reason_changed = current_reason(obj.status.as_ref()) != Some(outcome.reason());
    if newly_allocated && !ctx.fence.holds() {
        return Err(Error::Fenced);
    }
    write_status(obj, api, &outcome, slivers, None, node_refusals).await?;
    if let Outcome::Allocated { range } = outcome
        && ctx.config.publish
    {
        let named = portslice_crds::names::resolve(&obj.spec.names, range, &obj.spec.protocols);
        match crate::publish::sync(
            &ctx.client,
            &ctx.published,
            &ctx.metrics,
            obj,
            range,
            &named,
            &members,
        )
        .await
        {
            Ok(()) => {}
            // Someone else's object under our name: say so on the slice, keep the rest working.
            Err(e @ crate::publish::PublishError::Foreign { .. }) => {
                warn_event(ctx, obj, "PublishConflict", e.to_string()).await;
            }
            Err(e) => return Err(Error::Publish(e)),
        }
    }
    if newly_allocated {
        ctx.metrics.allocations.inc();
        if let Outcome::Allocated { range } = &outcome {
            info!(%range, "allocated");
        }
    }
    let announce = if matches!(outcome, Outcome::Allocated { .. }) {
        newly_allocated && ctx.config.allocation_events
    } else {
        reason_changed
    };
    if announce {
        publish(ctx, obj, &outcome).await;
    }
    Ok(match outcome {
        // Slice and pod events drive everything else; no periodic resync entry per slice
        // (10,000 timers are memory for nothing).
        // ...except to let a node's refusal expire.
        Outcome::Allocated { .. } => match refusals_expire {
            Some(left) => Action::requeue(left + Duration::from_secs(1)),
            None => Action::await_change(),
        },
        Outcome::Waiting { .. } => Action::requeue(ctx.config.retry_interval),
        Outcome::Refused { .. } | Outcome::Terminating { .. } => Action::await_change(),
    })
}

fn invalid(message: String) -> Outcome {
    Outcome::Refused {
        reason: conditions::REASON_INVALID,
        message,
    }
}

/// The allocation decision, made under the index lock and without I/O: the policy first (the
/// node's own ports, the reservations policy, the namespace's quota), then the table.
fn decide(obj: &PortSlice, ctx: &Context) -> Outcome {
    let id = SliceId::of(obj);
    // A range in the status is kept whatever happens: pods may be using it.
    if let Some(range) = obj.status.as_ref().and_then(|s| s.range) {
        return Outcome::Allocated { range };
    }
    let policy = &ctx.config.policy;
    let wanted = match (obj.spec.size, obj.spec.ports) {
        (Some(size), None) => size,
        (None, Some(ports)) if ports.start >= 1 && ports.start <= ports.end => {
            if let Err(message) =
                policy.check_reservation(&id.namespace, &ports, &obj.spec.protocols)
            {
                return Outcome::Refused {
                    reason: conditions::REASON_FORBIDDEN,
                    message,
                };
            }
            ports.len()
        }
        (None, Some(ports)) => {
            return invalid(format!("spec.ports {ports:?} is not a valid range"));
        }
        _ => return invalid("set exactly one of spec.size or spec.ports".into()),
    };
    let mut index = ctx.index();
    if !policy.quotas().is_unlimited()
        && let Err(message) =
            policy.check_quota(&id.namespace, index.usage(&id.namespace, &id), wanted)
    {
        return Outcome::Waiting {
            reason: conditions::REASON_QUOTA_EXCEEDED,
            message: format!("{message}; waiting for a slice of the namespace to be deleted"),
        };
    }
    match (obj.spec.size, obj.spec.ports) {
        (Some(size), _) => match index.allocate(&id, size) {
            Ok(range) => Outcome::Allocated { range },
            Err(AllocError::Exhausted { size, largest_free }) => Outcome::Waiting {
                reason: conditions::REASON_POOL_EXHAUSTED,
                message: format!(
                    "no free run of {size} ports left in the pool {} (largest free run: {largest_free}); \
                     waiting for a slice to be deleted",
                    ctx.config.pool
                ),
            },
            Err(e) => invalid(e.to_string()),
        },
        (None, Some(ports)) => match index.reserve_exact(&id, age_of(obj), ports) {
            Ok(range) => Outcome::Allocated { range },
            Err(ExactRefusal::Held { holder, held }) => Outcome::Waiting {
                reason: conditions::REASON_CONFLICT,
                message: format!(
                    "ports {ports} overlap {held}, held by PortSlice {holder}; waiting until it is deleted"
                ),
            },
            Err(ExactRefusal::OlderClaim {
                claimant,
                ports: theirs,
            }) => Outcome::Waiting {
                reason: conditions::REASON_CONFLICT,
                message: format!(
                    "ports {ports} overlap {theirs}, requested by the older PortSlice {claimant}, which goes first"
                ),
            },
        },
        (None, None) => invalid("set exactly one of spec.size or spec.ports".into()),
    }
}

/// A deleted slice: its range stays reserved until no pod of it is left, then for the
/// quarantine (late packets, TIME_WAIT); only then may the finalizer go.
async fn cleanup(obj: &PortSlice, ctx: &Context, api: &Api<PortSlice>) -> Result<Action, Error> {
    let id = SliceId::of(obj);
    ctx.index().stop_waiting(&ObjectRef::from_obj(obj));
    // The index may know a range whose status write is still in flight.
    let range = obj
        .status
        .as_ref()
        .and_then(|s| s.range)
        .or_else(|| ctx.index().range_of(&id));
    let Some(range) = range else {
        return Ok(Action::await_change());
    };
    let all_pods = ctx.pods.state();
    let members = pods::members(obj, all_pods.iter().map(AsRef::as_ref));
    let slivers = pods::slivers(&members);
    if !members.is_empty() {
        let names: Vec<String> = members.iter().take(5).map(|p| p.name_any()).collect();
        let outcome = Outcome::Terminating {
            range: Some(range),
            message: format!(
                "deleted; ports {range} stay reserved until {} pod(s) of the slice are gone: {}",
                members.len(),
                names.join(", ")
            ),
        };
        write_status(obj, api, &outcome, slivers, None, Vec::new()).await?;
        // Pod events wake us; the requeue is a safety net.
        return Err(Error::Held(ctx.config.retry_interval));
    }
    let now = Timestamp::now();
    let drained_at = obj
        .status
        .as_ref()
        .and_then(|s| s.drained_at.as_deref())
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or(now);
    let quarantine = ctx.config.quarantine;
    let until = drained_at + quarantine_span(quarantine);
    if now < until {
        let outcome = Outcome::Terminating {
            range: Some(range),
            message: format!("deleted and drained; ports {range} stay in quarantine until {until}"),
        };
        write_status(
            obj,
            api,
            &outcome,
            slivers,
            Some(second_text(drained_at)),
            Vec::new(),
        )
        .await?;
        let left = until.duration_since(now).unsigned_abs();
        return Err(Error::Held(left.max(Duration::from_millis(50))));
    }
    info!(%range, "drained and quarantined; releasing");
    let released = Outcome::Terminating {
        range: Some(range),
        message: format!("ports {range} released"),
    };
    publish(ctx, obj, &released).await;
    // The finalizer helper removes the finalizer now; the index frees the range when the
    // slice's deletion shows up in the watch, i.e. once it is really gone.
    Ok(Action::await_change())
}

fn quarantine_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// RFC 3339 at second precision, like every other Kubernetes timestamp.
fn second_text(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

/// Applies the desired status if it differs from the current one. The patch carries the
/// resourceVersion the decision was based on: if the slice changed meanwhile (or another
/// operator wrote it), the API server refuses with 409 and we decide again from fresh data.
async fn write_status(
    obj: &PortSlice,
    api: &Api<PortSlice>,
    outcome: &Outcome,
    slivers: Vec<portslice_crds::Sliver>,
    drained_at: Option<String>,
    node_refusals: Vec<portslice_crds::NodeRefusal>,
) -> Result<(), Error> {
    let now = second_text(Timestamp::now());
    let status = desired(
        outcome,
        StatusInput {
            current: obj.status.as_ref(),
            generation: obj.meta().generation,
            slivers,
            drained_at,
            node_refusals,
            names: &obj.spec.names,
            protocols: &obj.spec.protocols,
            now: &now,
        },
    );
    if obj.status.as_ref() == Some(&status) {
        return Ok(());
    }
    write(obj, api, &status)
        .await
        .map_err(|source| Error::WriteStatus {
            slice: SliceId::of(obj).to_string(),
            source,
        })
}

async fn write(
    obj: &PortSlice,
    api: &Api<PortSlice>,
    status: &PortSliceStatus,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": PortSlice::api_version(&()),
        "kind": PortSlice::kind(&()),
        "metadata": { "name": obj.name_any(), "resourceVersion": obj.resource_version() },
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A Warning Event on the slice. A failed Event is logged, never fatal.
async fn warn_event(ctx: &Context, obj: &PortSlice, reason: &str, note: String) {
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Publish".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "failed to publish event");
    }
}

/// Emits an Event for the outcome. A failed Event is logged, never fatal.
async fn publish(ctx: &Context, obj: &PortSlice, outcome: &Outcome) {
    let (type_, action) = match outcome {
        Outcome::Allocated { .. } => (EventType::Normal, "Allocate"),
        Outcome::Waiting { .. } => (EventType::Warning, "Allocate"),
        Outcome::Refused { .. } => (EventType::Warning, "Validate"),
        Outcome::Terminating { .. } => (EventType::Normal, "Release"),
    };
    let reason = match outcome {
        Outcome::Terminating { .. } => "Released".to_string(),
        o => o.reason().to_string(),
    };
    let event = KubeEvent {
        type_,
        reason,
        note: Some(outcome.message()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "failed to publish event");
    }
}
