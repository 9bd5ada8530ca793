//! The fault suite's sizes and seeds: bounded by default, `HINGNETD_FAULTS=full` for the full
//! sizes; fixed seeds, `HINGNETD_FAULTS_SEED=N` to replay one.

#![allow(dead_code)]

pub fn full() -> bool {
    std::env::var("HINGNETD_FAULTS").is_ok_and(|v| v == "full")
}

/// Bounded or full size.
pub fn scale(bounded: usize, full_size: usize) -> usize {
    if full() { full_size } else { bounded }
}

/// The test's fixed seed, unless `HINGNETD_FAULTS_SEED` says otherwise.
pub fn seed(default: u64) -> u64 {
    std::env::var("HINGNETD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
