//! The fault suite's sizes and seeds: bounded by default, `HINGNETD_FAULTS=full` for the full
//! sizes; fixed seeds, `HINGNETD_FAULTS_SEED=N` to replay one.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;

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

/// What producer `p` of four inserts: the IDs at positions `i` with `i % 4` in `{p, p + 1}`
/// (so every ID is inserted by two producers), then random picks of any ID until the list is
/// `len` long (duplicates within one list too), shuffled.
pub fn producer_share<'a>(
    ids: &[&'a str],
    p: usize,
    len: usize,
    rng: &mut fastrand::Rng,
) -> Vec<&'a str> {
    let mut mine: Vec<&str> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == p || i % 4 == (p + 1) % 4)
        .map(|(_, id)| *id)
        .collect();
    while mine.len() < len {
        mine.push(ids[rng.usize(..ids.len())]);
    }
    rng.shuffle(&mut mine);
    mine
}

/// Every ID the producers acknowledged: the lines of their `acked` files.
pub fn acknowledged<'a>(files: impl IntoIterator<Item = &'a Path>) -> HashSet<String> {
    let mut acked = HashSet::new();
    for file in files {
        acked.extend(
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    acked
}
