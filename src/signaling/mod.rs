//! Signaling: the versioned JSON protocol and the per-connection session state machine.
pub mod protocol;
pub mod session;
