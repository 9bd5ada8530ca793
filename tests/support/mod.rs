//! Shared test support: the HingNet stand-in server and the harness that runs the real binary.

pub mod harness;
pub mod standin;
