use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A transport protocol whose ports the slice owns.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[allow(clippy::upper_case_acronyms)]
pub enum Protocol {
    TCP,
    UDP,
}

impl Protocol {
    /// Both, in the order slices default to.
    pub const ALL: [Protocol; 2] = [Protocol::TCP, Protocol::UDP];
}
