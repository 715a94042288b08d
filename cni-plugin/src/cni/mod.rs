//! The CNI protocol: spec types, configuration, results, errors and the verbs.
//!
//! Pure parts (`env`, `config`, `result`, `version`, `error`) have no I/O; `verbs` does the
//! work and is driven by `main` in CNI mode.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod timing;
pub mod verbs;
pub mod version;
