//! etcd-format snapshots both ways, with the real tools: Keel -> `etcdctl snapshot save` ->
//! `etcdctl snapshot status|restore` -> a real etcd serves it; etcd -> `etcdctl snapshot save`
//! -> `keel snapshot restore` -> Keel serves it; an etcd data dir -> `keel migrate` -> Keel
//! serves it. "Serves it" means every key with the same create/mod revisions, versions,
//! values and leases, the same HashKV, and compacted history still compacted.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::{etcdctl, Keel, LiveEtcd};

fn ok(ep: &str, args: &[&str]) -> String {
    let (success, out, err) = etcdctl(ep, args, None);
    assert!(success, "etcdctl {args:?} failed: {err}");
    out
}

fn json(ep: &str, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-w", "json"]);
    serde_json::from_str(&ok(ep, &a)).unwrap()
}

/// Every key as served (revisions, version, value, lease).
fn all_keys(ep: &str) -> Value {
    json(ep, &["get", "", "--prefix"])["kvs"].clone()
}

fn hash_kv(ep: &str, rev: i64) -> u64 {
    json(ep, &["endpoint", "hashkv", "--rev", &rev.to_string()])[0]["HashKV"]["hash"]
        .as_u64()
        .unwrap()
}

fn revision(ep: &str) -> i64 {
    json(ep, &["get", "x"])["header"]["revision"]
        .as_i64()
        .unwrap()
}

/// What a server serves, to compare another with: its revision, every key, its HashKV.
struct Served {
    rev: i64,
    keys: Value,
    hash: u64,
}

impl Served {
    fn of(ep: &str) -> Served {
        let rev = revision(ep);
        Served {
            rev,
            keys: all_keys(ep),
            hash: hash_kv(ep, rev),
        }
    }

    /// `ep` serves the same (at the same revision).
    fn check(&self, ep: &str) {
        assert_eq!(revision(ep), self.rev);
        self.check_keys(ep);
    }

    /// `ep` serves the same keys and hash (its revision may have moved on).
    fn check_keys(&self, ep: &str) {
        assert_eq!(all_keys(ep), self.keys);
        assert_eq!(hash_kv(ep, self.rev), self.hash);
    }
}

/// Runs the keel binary's offline commands; (ok, stdout, stderr).
fn keel(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `keel snapshot restore FILE --data-dir DIR [EXTRA...]`; (ok, stdout, stderr).
fn keel_restore(file: &Path, data_dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    keel(&args)
}

fn etcdctl_offline(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .expect("etcdctl on PATH (scripts/setup.sh)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A history with everything a snapshot carries: overwrites, a delete, a lease with a key,
/// a compaction, values large enough for overflow pages and enough keys for branch pages.
/// Returns the lease ID (hex) and the compaction revision.
fn write_history(ep: &str) -> (String, i64) {
    ok(ep, &["put", "a", "1"]);
    ok(ep, &["put", "b", "2"]);
    ok(ep, &["put", "a", "3"]);
    let lease = ok(ep, &["lease", "grant", "900"]);
    let lease = lease.split_whitespace().nth(1).unwrap().to_string();
    ok(ep, &["put", "c", "4", "--lease", &lease]);
    ok(ep, &["del", "b"]);
    ok(ep, &["compact", "4"]);
    ok(ep, &["put", "big", &"v".repeat(20_000)]);
    // One txn of many puts: many records (branch pages) in one etcdctl call.
    let ops: String = (0..120)
        .map(|i| format!("put key{i:03} {}\n", "x".repeat(100 + i)))
        .collect();
    let (success, _, err) = etcdctl(ep, &["txn"], Some(&format!("\n{ops}\n\n")));
    assert!(success, "txn: {err}");
    ok(ep, &["put", "a", "5"]);
    (lease, 4)
}

fn check_compacted(ep: &str, compacted: i64) {
    let (success, _, err) = etcdctl(
        ep,
        &["get", "a", "--rev", &(compacted - 1).to_string()],
        None,
    );
    assert!(
        !success && err.contains("required revision has been compacted"),
        "{err}"
    );
    assert!(etcdctl(ep, &["get", "a", "--rev", &compacted.to_string()], None).0);
}

/// `ep` serves `write_history`'s state as `served` saw it: the same keys, revision and hash,
/// history below `compacted` compacted, and `lease` with its TTL and its key "c".
fn check_history(ep: &str, served: &Served, lease: &str, compacted: i64) {
    served.check(ep);
    check_compacted(ep, compacted);
    let ttl = json(ep, &["lease", "timetolive", lease, "--keys"]);
    assert_eq!(ttl["granted-ttl"].as_i64(), Some(900));
    assert_eq!(ttl["keys"][0].as_str(), Some("Yw==")); // "c"
}

/// `etcdctl snapshot restore FILE` into `data_dir` as member `name` (peer URL `peer`) of a
/// new cluster of one with `token`; etcdctl's log (stderr).
fn etcdctl_restore(file: &Path, data_dir: &Path, name: &str, peer: &str, token: &str) -> String {
    let (success, _, err) = etcdctl_offline(&[
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--name",
        name,
        "--initial-cluster",
        &format!("{name}={peer}"),
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster-token",
        token,
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    assert!(success, "etcdctl snapshot restore: {err}");
    err
}

/// Restores `file` into `dir`/ref.etcd, where `LiveEtcd::start(dir)` finds it.
fn restore_into_etcd(file: &Path, dir: &Path) {
    let data = dir.join("ref.etcd");
    etcdctl_restore(file, &data, "ref", "http://127.0.0.1:1", "etcd-cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_snapshot_saves_and_restores_into_etcd() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("k")).unwrap();
    let k = Keel::start_async(&dir.path().join("k"), &[]).await;
    // The guide's endpoint form: the whole URL.
    let ep = k.url();
    let (lease, compacted) = write_history(&ep);
    let file = dir.path().join("backup.db");
    let out = ok(&ep, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(out.contains("Snapshot saved at"), "{out}");
    let served = Served::of(&ep);

    // etcdctl reads the file with bbolt.
    let (success, st, err) =
        etcdctl_offline(&["snapshot", "status", file.to_str().unwrap(), "-w", "json"]);
    assert!(success, "{err}");
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["revision"].as_i64(), Some(served.rev));
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(
        st["totalSize"].as_u64(),
        Some(size - 32),
        "the file is the db + sha256"
    );
    // Records kept by the compaction at 4: a@4, b@3 (b's latest at 4), c@5, b's tombstone
    // @6, big@7, 120 keys @8, a@9; then 1 lease, 1 member, auth's revision and 5 meta entries
    // (raft's configuration, consistent index, term, both compaction revisions).
    assert_eq!(st["totalKey"].as_u64(), Some(126 + 1 + 1 + 1 + 5));
    // keel's own status prints what etcdctl prints, in every format.
    for format in ["simple", "table", "json", "fields"] {
        let (a_ok, a, a_err) =
            etcdctl_offline(&["snapshot", "status", file.to_str().unwrap(), "-w", format]);
        let (b_ok, b, b_err) = keel(&["snapshot", "status", file.to_str().unwrap(), "-w", format]);
        assert!(a_ok && b_ok, "{a_err} {b_err}");
        assert_eq!(a, b, "-w {format}");
    }

    // A real etcd restored from it serves the same keys, lease and hash.
    restore_into_etcd(&file, dir.path());
    let etcd = LiveEtcd::start(dir.path()).await;
    let eep = etcd.endpoint();
    check_history(&eep, &served, &lease, compacted);
}

/// A real etcd with `write_history`, saved with `etcdctl snapshot save` into `dir`, then
/// stopped: the file, what the etcd served, the lease (hex) and the compaction revision.
async fn etcd_backup(dir: &Path) -> (std::path::PathBuf, Served, String, i64) {
    let etcd = LiveEtcd::start(dir).await;
    let eep = etcd.endpoint();
    let (lease, compacted) = write_history(&eep);
    let file = dir.join("etcd-backup.db");
    ok(&eep, &["snapshot", "save", file.to_str().unwrap()]);
    (file, Served::of(&eep), lease, compacted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_snapshot_restores_into_keel() {
    let dir = tempfile::tempdir().unwrap();
    let (file, served, lease, compacted) = etcd_backup(dir.path()).await;

    // What a damaged file gets: refused by name, nothing left behind.
    let bytes = std::fs::read(&file).unwrap();
    let bad_dir = dir.path().join("bad.keel");
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (success, _, err) = keel_restore(&truncated, &bad_dir, &[]);
    assert!(!success);
    assert!(
        err.contains("snapshot missing hash but --skip-hash-check=false"),
        "{err}"
    );
    let (success, _, err) = keel_restore(&truncated, &bad_dir, &["--skip-hash-check"]);
    assert!(!success && err.contains("truncated"), "{err}");
    let flipped = dir.path().join("flipped.db");
    let mut b = bytes.clone();
    b[3 * 4096 + 100] ^= 0xff;
    std::fs::write(&flipped, &b).unwrap();
    let (success, _, err) = keel_restore(&flipped, &bad_dir, &[]);
    assert!(
        !success && err.contains("Error: expected sha256 ["),
        "{err}"
    );
    assert!(!bad_dir.exists(), "a refused restore leaves no data dir");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("bad.keel"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // etcd's own file restores into a Keel member that serves every key as etcd did.
    let kdir = dir.path().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    let data = kdir.join("data.keel");
    let (success, _, err) = keel_restore(&file, &data, &[]);
    assert!(success, "{err}");
    assert!(err.contains(r#""msg":"restored snapshot""#), "{err}");
    let (success, _, err) = keel_restore(&file, &data, &[]);
    assert!(!success);
    assert_eq!(
        err.trim(),
        format!("Error: data-dir {:?} exists", data.display().to_string())
    );
    let k = Keel::start_async(&kdir, &[]).await;
    let ep = k.endpoint();
    check_history(&ep, &served, &lease, compacted);
    // The restored member is a new cluster of one, and takes writes.
    assert_eq!(ok(&ep, &["put", "after", "restore"]), "OK\n");
    assert_eq!(revision(&ep), served.rev + 1);
    // And a file without its hash restores with --skip-hash-check (a copied member db).
    let nohash = dir.path().join("nohash.db");
    std::fs::write(&nohash, &bytes[..bytes.len() - 32]).unwrap();
    let d2 = dir.path().join("k2.keel");
    let (success, _, err) = keel_restore(&nohash, &d2, &["--skip-hash-check"]);
    assert!(success, "{err}");
}

/// A member killed with writes its backend had not committed yet (a long batch interval):
/// those live only in its WAL, and the migration applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_data_dir_migrates_with_its_wal_tail() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start_with(dir.path(), &["--backend-batch-interval", "1h"]).await;
    let eep = etcd.endpoint();
    let (lease, compacted) = write_history(&eep);
    for i in 0..20 {
        ok(&eep, &["put", &format!("tail{i}"), &i.to_string()]);
    }
    let served = Served::of(&eep);
    drop(etcd); // SIGKILL: no clean close of the backend
    let kdir = dir.path().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    let (success, _, err) = keel(&[
        "migrate",
        "--etcd-data-dir",
        dir.path().join("ref.etcd").to_str().unwrap(),
        "--data-dir",
        kdir.join("data.keel").to_str().unwrap(),
    ]);
    assert!(success, "{err}");
    let applied: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert!(
        applied["applied-entries"].as_u64().unwrap() >= 20,
        "the WAL tail was applied: {err}"
    );
    let k = Keel::start_async(&kdir, &[]).await;
    let ep = k.endpoint();
    check_history(&ep, &served, &lease, compacted);

    // The way back: Keel's state exported offline, restored by etcdctl, served by etcd.
    drop(k);
    let file = dir.path().join("export.db");
    let (success, _, err) = keel(&[
        "snapshot",
        "export",
        file.to_str().unwrap(),
        "--data-dir",
        kdir.join("data.keel").to_str().unwrap(),
    ]);
    assert!(success, "{err}");
    let back = dir.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    restore_into_etcd(&file, &back);
    let etcd = LiveEtcd::start(&back).await;
    let eep = etcd.endpoint();
    served.check_keys(&eep);
}

/// The guide's disaster recovery as written: `etcdctl snapshot restore ... --data-dir D`
/// makes an etcd data dir, and the server is started on D. Keel takes it over, as the member
/// etcd's restore made (its member ID comes from the restore's flags, not the start flags).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_starts_on_a_data_dir_etcdctl_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (file, served, lease, compacted) = etcd_backup(dir.path()).await;
    let kdir = dir.path().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    let data = kdir.join("data.keel");
    let err = etcdctl_restore(&file, &data, "node1", "http://127.0.0.1:2380", "new-token");
    let added: Value = serde_json::from_str(
        err.lines()
            .find(|l| l.contains(r#""msg":"added member""#))
            .unwrap(),
    )
    .unwrap();
    let k = Keel::start_async(&kdir, &[]).await;
    let ep = k.endpoint();
    check_history(&ep, &served, &lease, compacted);
    let status = json(&ep, &["endpoint", "status"]);
    let id = status[0]["Status"]["header"]["member_id"].as_u64().unwrap();
    assert_eq!(format!("{id:x}"), added["added-peer-id"].as_str().unwrap());
    let cid = status[0]["Status"]["header"]["cluster_id"]
        .as_u64()
        .unwrap();
    assert_eq!(format!("{cid:x}"), added["cluster-id"].as_str().unwrap());
    assert!(k.log_text().contains("took over an etcd data dir"));
    assert!(data.join("member/snap/etcd-imported.db").exists());
    // Writes go on, and a restart is an ordinary one.
    assert_eq!(ok(&ep, &["put", "after", "1"]), "OK\n");
    drop(k);
    let k = Keel::start_async(&kdir, &[]).await;
    assert_eq!(revision(&k.endpoint()), served.rev + 1);
}

/// A real etcd member killed with writes its backend had not committed, its data dir then
/// given to Keel as it is: Keel takes it over with etcd's identity and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_takes_over_a_killed_etcd_members_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start_with(dir.path(), &["--backend-batch-interval", "1h"]).await;
    let eep = etcd.endpoint();
    write_history(&eep);
    for i in 0..10 {
        ok(&eep, &["put", &format!("tail{i}"), &i.to_string()]);
    }
    let served = Served::of(&eep);
    let etcd_id = json(&eep, &["endpoint", "status"])[0]["Status"]["header"]["member_id"]
        .as_u64()
        .unwrap();
    drop(etcd);
    let kdir = dir.path().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::rename(dir.path().join("ref.etcd"), kdir.join("data.keel")).unwrap();
    let k = Keel::start_async(&kdir, &[]).await;
    let ep = k.endpoint();
    served.check(&ep);
    let id = json(&ep, &["endpoint", "status"])[0]["Status"]["header"]["member_id"]
        .as_u64()
        .unwrap();
    assert_eq!(id, etcd_id, "etcd's member ID is kept");
}

/// A member of an etcd cluster that has run cannot be taken over alone (its peers stopped
/// at other points): Keel refuses with the way to do it, and leaves the dir as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_a_cluster_that_ran_is_not_taken_over_alone() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start(dir.path()).await;
    let eep = etcd.endpoint();
    ok(&eep, &["put", "a", "1"]);
    // A second voter: committed at once (etcd 3.4 has no strict check by default).
    ok(
        &eep,
        &[
            "member",
            "add",
            "other",
            "--peer-urls",
            "http://127.0.0.1:1",
        ],
    );
    drop(etcd);
    let data = dir.path().join("ref.etcd");
    let port = crate::harness::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .arg(format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            crate::harness::free_port()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot be taken over one by one"), "{err}");
    assert!(data.join("member/snap/db").exists(), "etcd's files stay");
    assert!(!data.join("member/snap/keel.db").exists());
}
