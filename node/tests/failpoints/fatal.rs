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
    let _serial = crate::serial();
    panics_and_exits("raft-apply", &["put", "a", "1"], "keel-raft");
}

#[test]
fn a_panic_on_a_net_core_stops_the_process() {
    let _serial = crate::serial();
    panics_and_exits("backend-range", &["get", "a"], "keel-net-0");
}

/// A crash at each storage site: keel dies there (a fail point panics, the hook exits),
/// restarts without the fail point, and every acknowledged write is there; the node then
/// serves writes again. `extra` sets up what reaches the site (WAL release needs small
/// segments and snapshots; compaction and defrag are asked for by the writer).
fn crash_at(site: &str, after: u32, extra: &[&str]) {
    use keel_proto::pb;
    let dir = tempfile::tempdir().unwrap();
    let trigger = format!("{site}={after}*off->panic(crash at {site})");
    let mut k = Keel::start_env(dir.path(), extra, &[("FAILPOINTS", &trigger)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = k.url();
    // key -> (value, revision) acknowledged; one writer, so later values are higher.
    let acked = rt.block_on(async {
        let mut c = crate::harness::kv(&url);
        let mut m = pb::maintenance_client::MaintenanceClient::connect(url.clone())
            .await
            .unwrap();
        let mut acked = std::collections::HashMap::new();
        for i in 0..20_000u32 {
            let key = format!("k{}", i % 300);
            let put = pb::PutRequest {
                key: key.clone().into(),
                value: i.to_string().into(),
                ..Default::default()
            };
            let Ok(r) = c.put(put).await else { break };
            let rev = r.into_inner().header.unwrap().revision;
            acked.insert(key, (i, rev));
            if i % 500 == 499 {
                let compact = pb::CompactionRequest {
                    revision: rev - 100,
                    physical: false,
                };
                if c.compact(compact).await.is_err()
                    || m.defragment(pb::DefragmentRequest {}).await.is_err()
                {
                    break;
                }
            }
            // Let backend batches (100 ms) happen between the writes.
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        acked
    });
    let status = k
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the fail point {site} was never reached"));
    assert_eq!(status.code(), Some(2), "{site}: {}", k.log_text());
    assert!(k.log_text().contains(&format!("crash at {site}")));
    k.clear_env();
    k.restart();
    let url = k.url();
    rt.block_on(async {
        let mut c = crate::harness::kv(&url);
        for (key, (value, rev)) in &acked {
            let got = c
                .range(pb::RangeRequest {
                    key: key.clone().into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let kv = got
                .kvs
                .first()
                .unwrap_or_else(|| panic!("{site}: acknowledged {key} lost"));
            let v: u32 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
            // The one put in flight at the crash may have been applied but not acknowledged.
            assert!(
                v >= *value && kv.mod_revision >= *rev,
                "{site}: {key} went back"
            );
        }
        c.put(pb::PutRequest {
            key: "after".into(),
            value: "restart".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert!(
        !acked.is_empty(),
        "{site}: nothing was written before the crash"
    );
}

#[test]
fn crash_before_and_after_a_wal_write() {
    let _serial = crate::serial();
    crash_at("wal-before-write", 200, &[]);
    crash_at("wal-after-write", 200, &[]);
}

#[test]
fn crash_around_a_backend_commit_and_its_meta_flip() {
    let _serial = crate::serial();
    crash_at("backend-before-commit", 3, &[]);
    crash_at("backend-before-meta", 3, &[]);
    crash_at("backend-after-commit", 3, &[]);
}

#[test]
fn crash_while_releasing_wal_segments() {
    let _serial = crate::serial();
    let small = [
        "--snapshot-count",
        "200",
        "--experimental-snapshot-catchup-entries",
        "50",
        "--wal-segment-bytes",
        "65536",
    ];
    crash_at("wal-release", 0, &small);
}

#[test]
fn crash_during_compaction_and_defragmentation() {
    let _serial = crate::serial();
    crash_at("compaction-chunk", 0, &[]);
    crash_at("defrag-copy", 0, &[]);
    crash_at("defrag-switch", 0, &[]);
}
