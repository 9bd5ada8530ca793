//! Shared test support: the HingNet stand-in server, the harness that runs the real binary, and
//! the leak sweep (`canary`).

pub mod audit;
pub mod canary;
pub mod harness;
pub mod standin;
pub mod tls;
