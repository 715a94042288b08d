//! What a slice's status should say, computed without I/O from the reconcile's decision.
use portslice_crds::{
    Condition, NodeRefusal, PortName, PortRange, PortSliceStatus, Protocol, Sliver, conditions,
    names,
};

/// The reconcile's verdict on a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The slice holds `range` and is usable.
    Allocated { range: PortRange },
    /// The slice waits for ports: `reason` is PoolExhausted or Conflict.
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// The spec cannot be satisfied as written: `reason` is Invalid (a malformed spec) or
    /// Forbidden (ports the policy does not allow). Nothing changes until the spec does.
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The slice is being deleted; it keeps `range` (if any) until drained and quarantined.
    Terminating {
        range: Option<PortRange>,
        message: String,
    },
}

impl Outcome {
    /// The reason shown on the Ready condition, also used to decide when to emit an Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Allocated { .. } => conditions::REASON_ALLOCATED,
            Outcome::Waiting { reason, .. } => reason,
            Outcome::Refused { reason, .. } => reason,
            Outcome::Terminating { .. } => conditions::REASON_TERMINATING,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Outcome::Allocated { range } => format!(
                "ports {range} ({} ports) are allocated to this slice",
                range.len()
            ),
            Outcome::Waiting { message, .. }
            | Outcome::Refused { message, .. }
            | Outcome::Terminating { message, .. } => message.clone(),
        }
    }
}

/// Inputs besides the outcome.
pub struct StatusInput<'a> {
    pub current: Option<&'a PortSliceStatus>,
    pub generation: Option<i64>,
    pub slivers: Vec<Sliver>,
    pub drained_at: Option<String>,
    /// Nodes refusing the slice's pods now (see `refusals`).
    pub node_refusals: Vec<NodeRefusal>,
    /// `spec.names` and `spec.protocols`, resolved into `namedPorts` once there is a range.
    pub names: &'a [PortName],
    pub protocols: &'a [Protocol],
    /// RFC 3339 "now", used only for conditions whose status changes.
    pub now: &'a str,
}

/// The full status to apply. Conditions keep their lastTransitionTime while their status stays
/// the same, so that applying the same verdict twice yields an identical status (and no write).
pub fn desired(outcome: &Outcome, input: StatusInput<'_>) -> PortSliceStatus {
    let range = match outcome {
        Outcome::Allocated { range } => Some(*range),
        Outcome::Terminating { range, .. } => *range,
        // A slice that waits or is invalid never held a range (a held range is never withdrawn).
        Outcome::Waiting { .. } | Outcome::Refused { .. } => input.current.and_then(|s| s.range),
    };
    let (allocated, allocated_reason, allocated_message) = match (outcome, range) {
        (_, Some(r)) => (
            "True",
            conditions::REASON_ALLOCATED,
            format!("ports {r} are reserved for this slice"),
        ),
        (o, None) => ("False", o.reason(), o.message()),
    };
    let ready = if matches!(outcome, Outcome::Allocated { .. }) {
        "True"
    } else {
        "False"
    };
    let previous = input
        .current
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = vec![
        condition(
            previous,
            conditions::ALLOCATED,
            allocated,
            allocated_reason,
            allocated_message,
            input.generation,
            input.now,
        ),
        condition(
            previous,
            conditions::READY,
            ready,
            outcome.reason(),
            outcome.message(),
            input.generation,
            input.now,
        ),
    ];
    let named_ports = range
        .map(|r| names::resolve(input.names, r, input.protocols))
        .unwrap_or_default();
    let named_ports_text = (!named_ports.is_empty()).then(|| {
        named_ports
            .iter()
            .map(|n| n.text())
            .collect::<Vec<_>>()
            .join(" ")
    });
    PortSliceStatus {
        range,
        named_ports,
        named_ports_text,
        range_text: range.map(|r| r.to_string()),
        size: range.map(|r| r.len()),
        sliver_count: u32::try_from(input.slivers.len()).unwrap_or(u32::MAX),
        slivers: input.slivers,
        drained_at: input.drained_at,
        node_refusal_count: u32::try_from(input.node_refusals.len()).unwrap_or(u32::MAX),
        node_refusals: input.node_refusals,
        observed_generation: input.generation,
        conditions,
    }
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The reason on the current Ready condition, if any.
pub fn current_reason(status: Option<&PortSliceStatus>) -> Option<&str> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map(|c| c.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: PortRange = PortRange {
        start: 40000,
        end: 40009,
    };

    fn input<'a>(current: Option<&'a PortSliceStatus>, now: &'a str) -> StatusInput<'a> {
        StatusInput {
            current,
            generation: Some(1),
            slivers: vec![],
            drained_at: None,
            node_refusals: vec![],
            names: &[],
            protocols: &[],
            now,
        }
    }

    #[test]
    fn allocation_sets_range_and_both_conditions() {
        let s = desired(&Outcome::Allocated { range: R }, input(None, "t1"));
        assert_eq!(s.range, Some(R));
        assert_eq!(s.range_text.as_deref(), Some("40000-40009"));
        assert_eq!(s.size, Some(10));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.status == "True" && c.reason == "Allocated")
        );
    }

    #[test]
    fn the_same_verdict_twice_gives_the_same_status() {
        let first = desired(&Outcome::Allocated { range: R }, input(None, "t1"));
        let again = desired(&Outcome::Allocated { range: R }, input(Some(&first), "t2"));
        assert_eq!(first, again);
    }

    #[test]
    fn waiting_keeps_allocated_false_with_the_reason() {
        let w = Outcome::Waiting {
            reason: conditions::REASON_POOL_EXHAUSTED,
            message: "full".into(),
        };
        let s = desired(&w, input(None, "t1"));
        assert_eq!(s.range, None);
        let allocated = &s.conditions[0];
        assert_eq!(
            (allocated.status.as_str(), allocated.reason.as_str()),
            ("False", "PoolExhausted")
        );
        assert_eq!(current_reason(Some(&s)), Some("PoolExhausted"));
    }

    #[test]
    fn terminating_keeps_the_range_and_flips_ready_only() {
        let first = desired(&Outcome::Allocated { range: R }, input(None, "t1"));
        let t = Outcome::Terminating {
            range: Some(R),
            message: "draining".into(),
        };
        let s = desired(&t, input(Some(&first), "t2"));
        assert_eq!(s.range, Some(R));
        assert_eq!(
            s.conditions[0].last_transition_time, "t1",
            "Allocated stays True since t1"
        );
        assert_eq!(
            (
                s.conditions[1].status.as_str(),
                s.conditions[1].last_transition_time.as_str()
            ),
            ("False", "t2")
        );
    }
}
