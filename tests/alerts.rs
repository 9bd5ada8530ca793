//! The Prometheus alerting rules shipped in the package (packaging/hingnetd.rules.yml): promtool
//! accepts them, their unit tests (packaging/hingnetd.rules.test.yml) pass, and every alert has a
//! `for:`, a severity, a summary and a description, and tests that fire it and tests that do not.

use std::path::PathBuf;
use std::process::{Command, Output};

const RULES: &str = "packaging/hingnetd.rules.yml";
const RULE_TESTS: &str = "packaging/hingnetd.rules.test.yml";

fn path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs promtool; a missing promtool fails the test (it is part of the suite, not optional).
fn promtool(args: &[&str], file: &str) -> Output {
    match Command::new("promtool").args(args).arg(path(file)).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool not found: run scripts/test, which installs it (Debian package prometheus)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_check_rules_accepts_the_rule_file() {
    // --lint-fatal: a lint finding (such as two rules with the same name and labels) fails too.
    let out = promtool(&["check", "rules", "--lint-fatal"], RULES);
    assert_success(&format!("promtool check rules {RULES}"), &out);
}

#[test]
fn promtool_unit_tests_pass() {
    let out = promtool(&["test", "rules"], RULE_TESTS);
    assert_success(&format!("promtool test rules {RULE_TESTS}"), &out);
}

/// What promtool does not check: each alert's own fields, and that the unit tests cover it both
/// ways. Reads the files as text (they are written in one layout), not as YAML.
#[test]
fn every_alert_is_documented_and_tested_both_ways() {
    let rules = std::fs::read_to_string(path(RULES)).unwrap();
    let tests = std::fs::read_to_string(path(RULE_TESTS)).unwrap();

    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            blocks.push((name.to_string(), String::new()));
        } else if let Some((_, block)) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(!blocks.is_empty(), "no alerts found in {RULES}");

    // Each alert_rule_test entry as (alertname, whether it expects any alert).
    let mut cases: Vec<(String, bool)> = Vec::new();
    let mut current: Option<(String, bool)> = None;
    for line in tests.lines() {
        let line = line.trim();
        if line.starts_with("- eval_time:") || line.starts_with("- name:") {
            cases.extend(current.take());
        }
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some((name.to_string(), false));
        } else if line.starts_with("exp_alerts:")
            && let Some((_, fires)) = current.as_mut()
        {
            *fires = true;
        }
    }
    cases.extend(current);

    for (name, block) in &blocks {
        for field in ["for: ", "severity: ", "summary: ", "description: "] {
            assert!(block.contains(field), "{name} in {RULES} has no `{field}`");
        }
        for (fires, what) in [(true, "fires"), (false, "does not fire")] {
            assert!(
                cases.iter().any(|(n, f)| n == name && *f == fires),
                "{RULE_TESTS} has no case where {name} {what}"
            );
        }
    }
}
