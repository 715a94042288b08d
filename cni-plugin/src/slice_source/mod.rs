//! (empty until implemented)
