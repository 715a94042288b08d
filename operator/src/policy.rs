//! Who may hold which ports: the node's own ports, the reservations policy and the per-namespace
//! quotas. Pure: the controller asks it before it allocates anything. The chart ships the same
//! reservation rules as a ValidatingAdmissionPolicy (`charts/portslice/templates/
//! admission-policies.yaml`), the first line; this is the second, since admission policies can
//! be off or bypassed.
use std::collections::BTreeMap;

use portslice_ports::{NodeCritical, PortRange, Protocol};
use serde::{Deserialize, Serialize};

/// Exact ports some namespaces may reserve (`spec.ports`). Without a rule, nobody may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReservationRule {
    /// `START-END` or `PORT`.
    pub ports: String,
    /// Protocols the reservation may cover (default both).
    #[serde(default = "both")]
    pub protocols: Vec<Protocol>,
    /// Namespaces that may reserve these ports.
    pub namespaces: Vec<String>,
}

fn both() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

/// A namespace's cap: ports held in total (size and exact slices alike) and number of slices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slices: Option<u32>,
}

/// The default cap for every namespace and the namespaces that differ.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quotas {
    #[serde(default)]
    pub default: Quota,
    #[serde(default)]
    pub namespaces: BTreeMap<String, Quota>,
}

impl Quotas {
    pub fn for_namespace(&self, namespace: &str) -> Quota {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    pub fn is_unlimited(&self) -> bool {
        self.default == Quota::default() && self.namespaces.is_empty()
    }
}

/// What a namespace holds now (without the slice being decided).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub ports: u32,
    pub slices: u32,
}

/// A reservation rule with its ports parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    ports: PortRange,
    protocols: Vec<Protocol>,
    namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("reservation rule {index}: ports {ports:?} is not a port range: {reason}")]
pub struct RuleError {
    index: usize,
    ports: String,
    reason: String,
}

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    critical: NodeCritical,
    rules: Vec<Rule>,
    quotas: Quotas,
}

impl Policy {
    pub fn new(
        critical: NodeCritical,
        reservations: &[ReservationRule],
        quotas: Quotas,
    ) -> Result<Self, RuleError> {
        let rules = reservations
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let ports = r.ports.parse::<PortRange>().map_err(|e| RuleError {
                    index,
                    ports: r.ports.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Rule {
                    ports,
                    protocols: r.protocols.clone(),
                    namespaces: r.namespaces.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            critical,
            rules,
            quotas,
        })
    }

    pub fn critical(&self) -> &NodeCritical {
        &self.critical
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Whether `namespace` may reserve exactly `ports` for `protocols`: never a node-critical
    /// port, and only as a rule allows. The error is the message for the condition and Event.
    pub fn check_reservation(
        &self,
        namespace: &str,
        ports: &PortRange,
        protocols: &[Protocol],
    ) -> Result<(), String> {
        if let Some(hit) = self.critical.overlap(ports) {
            return Err(NodeCritical::refusal(ports, hit));
        }
        let allowed = self.rules.iter().any(|r| {
            r.ports.start <= ports.start
                && ports.end <= r.ports.end
                && protocols.iter().all(|p| r.protocols.contains(p))
                && r.namespaces.iter().any(|n| n == namespace)
        });
        if allowed {
            return Ok(());
        }
        let here: Vec<String> = self
            .rules
            .iter()
            .filter(|r| r.namespaces.iter().any(|n| n == namespace))
            .map(|r| format!("{} ({})", r.ports, protocols_text(&r.protocols)))
            .collect();
        Err(if here.is_empty() {
            format!(
                "namespace {namespace} may not reserve exact ports: ask for a size instead, or ask \
                 the cluster admin for a reservation rule (chart value reservations)"
            )
        } else {
            format!(
                "ports {ports} ({}) are not open to reservation in namespace {namespace}; it may \
                 reserve: {}",
                protocols_text(protocols),
                here.join(", ")
            )
        })
    }

    /// Whether `namespace`, holding `usage`, may take `size` more ports in one more slice. The
    /// error is the message for the condition.
    pub fn check_quota(&self, namespace: &str, usage: Usage, size: u32) -> Result<(), String> {
        let q = self.quotas.for_namespace(namespace);
        if let Some(max) = q.slices
            && usage.slices + 1 > max
        {
            return Err(format!(
                "namespace {namespace} holds {} slices, its cap is {max}",
                usage.slices
            ));
        }
        if let Some(max) = q.ports
            && usage.ports.saturating_add(size) > max
        {
            return Err(format!(
                "namespace {namespace} holds {} ports; {size} more would pass its cap of {max}",
                usage.ports
            ));
        }
        Ok(())
    }
}

fn protocols_text(p: &[Protocol]) -> String {
    p.iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    fn policy() -> Policy {
        Policy::new(
            NodeCritical::default(),
            &[ReservationRule {
                ports: "5060-5061".into(),
                protocols: vec![Protocol::UDP, Protocol::TCP],
                namespaces: vec!["voice".into()],
            }],
            Quotas {
                default: Quota {
                    ports: Some(1000),
                    slices: Some(2),
                },
                namespaces: BTreeMap::from([(
                    "big".to_string(),
                    Quota {
                        ports: Some(50_000),
                        slices: None,
                    },
                )]),
            },
        )
        .unwrap()
    }

    #[test]
    fn node_critical_ports_are_refused_even_where_a_rule_would_allow() {
        let p = Policy::new(
            NodeCritical::default(),
            &[ReservationRule {
                ports: "1-65535".into(),
                protocols: both(),
                namespaces: vec!["root".into()],
            }],
            Quotas::default(),
        )
        .unwrap();
        for ports in [
            r(22, 22),
            r(10250, 10250),
            r(30000, 32767),
            r(2379, 2380),
            r(6443, 6443),
        ] {
            let e = p.check_reservation("root", &ports, &both()).unwrap_err();
            assert!(e.contains("node's own ports"), "{ports}: {e}");
        }
        assert!(p.check_reservation("root", &r(5060, 5061), &both()).is_ok());
    }

    #[test]
    fn reservations_need_a_rule_for_the_namespace_ports_and_protocols() {
        let p = policy();
        assert!(
            p.check_reservation("voice", &r(5060, 5061), &both())
                .is_ok()
        );
        assert!(
            p.check_reservation("voice", &r(5060, 5060), &[Protocol::UDP])
                .is_ok()
        );
        let e = p
            .check_reservation("voice", &r(5060, 5062), &both())
            .unwrap_err();
        assert!(
            e.contains("5060-5061 (UDP,TCP)"),
            "says what is allowed: {e}"
        );
        let e = p
            .check_reservation("web", &r(5060, 5061), &both())
            .unwrap_err();
        assert!(e.contains("may not reserve exact ports"), "{e}");
        assert!(
            Policy::new(
                NodeCritical::default(),
                &[ReservationRule {
                    ports: "x".into(),
                    protocols: both(),
                    namespaces: vec![]
                }],
                Quotas::default()
            )
            .is_err()
        );
    }

    #[test]
    fn quotas_cap_ports_and_slices_per_namespace() {
        let p = policy();
        let held = |ports, slices| Usage { ports, slices };
        assert!(p.check_quota("a", held(0, 0), 1000).is_ok());
        assert!(p.check_quota("a", held(500, 1), 500).is_ok());
        let e = p.check_quota("a", held(500, 1), 501).unwrap_err();
        assert!(e.contains("cap of 1000"), "{e}");
        let e = p.check_quota("a", held(10, 2), 1).unwrap_err();
        assert!(e.contains("2 slices"), "{e}");
        assert!(
            p.check_quota("big", held(40_000, 30), 10_000).is_ok(),
            "override, no slice cap"
        );
        assert!(Quotas::default().is_unlimited());
        let none = Policy::new(NodeCritical::default(), &[], Quotas::default()).unwrap();
        assert!(
            none.check_quota("a", held(u32::MAX, u32::MAX - 1), 1)
                .is_ok()
        );
    }
}
