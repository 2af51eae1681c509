//! Fail-stop: a panic on any core takes the whole process down, with a non-zero status and a
//! log line saying why, so a supervisor (systemd's Restart=on-failure) restarts it. Before,
//! a dead raft core left a process that answered reads and health checks and failed writes.
//! The panics are triggered through fail points (built with the `failpoints` feature).

use std::time::Duration;

use crate::harness::{etcdctl, Keel};

fn panics_and_exits(failpoint: &str, args: &[&str], thread: &str) {
    let dir = tempfile::tempdir().unwrap();
    let trigger = format!("{failpoint}=panic(test trigger)");
    let mut k = Keel::start_env(dir.path(), &[], &[("FAILPOINTS", &trigger)]);
    let ep = k.endpoint();
    let mut args = args.to_vec();
    args.push("--command-timeout=3s");
    let (ok, _, _) = etcdctl(&ep, &args, None);
    assert!(!ok, "etcdctl {args:?} answered through a panic");
    let status = k
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("keel still runs after a panic on {thread}"));
    assert_eq!(status.code(), Some(2), "{status}");
    let log = k.log_text();
    assert!(
        log.contains(&format!("fatal: panic on thread {thread}")) && log.contains("test trigger"),
        "{log}"
    );
    let (healthy, out, err) = etcdctl(&ep, &["endpoint", "health", "--dial-timeout=1s"], None);
    assert!(!healthy, "{out}{err}");
}

#[test]
fn a_panic_on_the_raft_core_stops_the_process() {
    panics_and_exits("raft-apply", &["put", "a", "1"], "keel-raft");
}

#[test]
fn a_panic_on_a_net_core_stops_the_process() {
    panics_and_exits("backend-range", &["get", "a"], "keel-net-0");
}
