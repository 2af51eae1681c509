//! etcdctl 3.4 against keel: the commands operators type, with the output etcd gives, with
//! both endpoint forms users type (`127.0.0.1:PORT`, and the deployment guide's
//! `http://127.0.0.1:PORT`, which etcdctl 3.4 sends whole as the HTTP/2 :authority on some
//! calls).

use serde_json::Value;

use crate::harness::{etcdctl, Keel, LiveEtcd};

fn ok(ep: &str, args: &[&str]) -> String {
    let (success, out, err) = etcdctl(ep, args, None);
    assert!(success, "etcdctl {args:?} failed: {err}");
    out
}

/// Runs `test` against a fresh keel (started with `extra`) once per endpoint form.
fn each_endpoint_form(extra: &[&str], test: impl Fn(&Keel, &str)) {
    for url_form in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let k = Keel::start(dir.path(), extra);
        let ep = if url_form { k.url() } else { k.endpoint() };
        test(&k, &ep);
    }
}

fn json(ep: &str, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-w", "json"]);
    serde_json::from_str(&ok(ep, &a)).unwrap()
}

#[test]
fn put_get_del_and_revisions_in_json() {
    each_endpoint_form(&[], |_k, ep| {
        assert_eq!(ok(ep, &["put", "foo", "bar"]), "OK\n");
        assert_eq!(ok(ep, &["get", "foo"]), "foo\nbar\n");
        let put = json(ep, &["put", "foo", "baz", "--prev-kv"]);
        assert_eq!(put["header"]["revision"], 3);
        assert_eq!(put["prev_kv"]["value"], "YmFy"); // "bar"
        let get = json(ep, &["get", "foo"]);
        let kv = &get["kvs"][0];
        assert_eq!(
            (
                kv["create_revision"].as_i64(),
                kv["mod_revision"].as_i64(),
                kv["version"].as_i64()
            ),
            (Some(2), Some(3), Some(2))
        );
        assert_eq!(
            get["header"]["member_id"].as_u64(),
            Some(0x8e9e05c52164694d)
        );
        assert_eq!(
            get["header"]["cluster_id"].as_u64(),
            Some(0xcdf818194e3a8c32)
        );
        assert!(get["header"]["raft_term"].as_u64().unwrap() >= 1);
        ok(ep, &["put", "fop", "1"]);
        ok(ep, &["put", "g", "1"]);
        assert_eq!(
            ok(ep, &["get", "fo", "--prefix", "--keys-only"]),
            "foo\n\nfop\n\n"
        );
        assert_eq!(ok(ep, &["get", "foo", "--rev=2"]), "foo\nbar\n");
        assert_eq!(ok(ep, &["del", "fo", "--prefix"]), "2\n");
        assert_eq!(ok(ep, &["get", "foo"]), "");
        let all = json(ep, &["get", "", "--from-key"]);
        assert_eq!(all["count"], 1);
        assert_eq!(all["header"]["revision"], 6);
    });
}

#[test]
fn interactive_txn_from_stdin() {
    each_endpoint_form(&[], |_k, ep| {
        ok(ep, &["put", "user1", "bad"]);
        let script = "value(\"user1\") = \"bad\"\n\nput user1 good\nget user1\n\ndel user1\n\n";
        // Interactive mode prints its prompts, then the result.
        let prompts =
            "compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n";
        let (success, out, err) = etcdctl(ep, &["txn", "-i"], Some(script));
        assert!(success, "{err}");
        assert_eq!(out, format!("{prompts}SUCCESS\n\nOK\n\nuser1\ngood\n"));
        let (success, out, _) = etcdctl(ep, &["txn", "-i"], Some(script));
        assert!(success);
        assert_eq!(
            out,
            format!("{prompts}FAILURE\n\n1\n"),
            "the compare fails now: the failure branch deletes"
        );
        assert_eq!(ok(ep, &["get", "user1"]), "");
        let (success, out, _) = etcdctl(ep, &["txn", "-w", "json"], Some("\nput a 1\n\n\n"));
        assert!(success);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["succeeded"], true);
        assert_eq!(
            v["responses"][0]["Response"]["ResponsePut"]["header"]["revision"],
            5
        );
    });
}

#[test]
fn compaction_and_compacted_reads() {
    each_endpoint_form(&[], |_k, ep| {
        for i in 0..5 {
            ok(ep, &["put", "k", &i.to_string()]);
        }
        // --physical answers once the compaction is carried out.
        assert_eq!(
            ok(ep, &["compact", "4", "--physical"]),
            "compacted revision 4\n"
        );
        let (success, _, err) = etcdctl(ep, &["get", "k", "--rev=3"], None);
        assert!(!success);
        assert!(
            err.contains("etcdserver: mvcc: required revision has been compacted"),
            "{err}"
        );
        assert_eq!(ok(ep, &["get", "k", "--rev=4"]), "k\n2\n");
        let (success, _, err) = etcdctl(ep, &["compact", "4"], None);
        assert!(
            !success && err.contains("required revision has been compacted"),
            "{err}"
        );
        let (success, _, err) = etcdctl(ep, &["compact", "100"], None);
        assert!(
            !success && err.contains("required revision is a future revision"),
            "{err}"
        );
    });
}

#[test]
fn endpoint_status_health_and_member_list() {
    each_endpoint_form(&["--name", "n1"], |k, ep| {
        let table = ok(ep, &["endpoint", "status", "-w", "table"]);
        let row = table
            .lines()
            .find(|l| l.contains(ep))
            .unwrap_or_else(|| panic!("{table}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | ENDPOINT | ID | VERSION | DB SIZE | IS LEADER | IS LEARNER | TERM | INDEX | APPLIED |
        assert_eq!(cells[3], "3.6.0");
        assert_eq!(cells[5], "true", "{row}");
        assert_eq!(cells[6], "false", "{row}");
        assert_eq!(
            cells[8], cells[9],
            "raft index == applied index when idle: {row}"
        );
        // etcdctl 3.4 prints health on stderr.
        let (healthy, out, err) = etcdctl(ep, &["endpoint", "health"], None);
        let health = out + &err;
        assert!(healthy, "{health}");
        assert!(
            health.contains("is healthy: successfully committed proposal"),
            "{health}"
        );
        let members = ok(ep, &["member", "list"]);
        let url = k.url();
        assert_eq!(
            members.trim(),
            format!(
                "{}, started, n1, http://localhost:2380, {url}, false",
                cells[2]
            )
        );
    });
}

/// `dbSize` of `endpoint status -w json`.
fn db_size(ep: &str) -> u64 {
    let st = json(ep, &["endpoint", "status"]);
    st[0]["Status"]["dbSize"].as_u64().expect("dbSize")
}

#[test]
fn db_size_is_never_zero_and_grows_with_writes() {
    each_endpoint_form(&[], |_k, ep| {
        let fresh = db_size(ep);
        assert!(fresh > 0, "a running member reports its backend's size");
        for i in 0..20 {
            ok(ep, &["put", &format!("k{i}"), &"v".repeat(1000)]);
        }
        // The backend commits in batches (100 ms): the size follows shortly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut after = db_size(ep);
        while after < fresh + 20_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            after = db_size(ep);
        }
        assert!(after >= fresh + 20_000, "{fresh} -> {after}");
        let st = json(ep, &["endpoint", "status"]);
        let in_use = st[0]["Status"]["dbSizeInUse"].as_u64().unwrap();
        let size = st[0]["Status"]["dbSize"].as_u64().unwrap();
        assert!(in_use > 0 && in_use <= size, "{in_use} of {size}");
    });
}

#[test]
fn per_endpoint_calls_and_unserved_rpcs_answer_as_etcd_would() {
    each_endpoint_form(&[], |_k, ep| {
        assert_eq!(
            ok(ep, &["defrag"]),
            format!("Finished defragmenting etcd member[{ep}]\n")
        );
        // A fresh store's hash is etcd's for an empty store.
        assert_eq!(
            ok(ep, &["endpoint", "hashkv"]),
            format!("{ep}, 1084519789\n")
        );
        // Not served yet: a clear Unimplemented naming the call, never PROTOCOL_ERROR.
        for (args, rpc) in [
            (
                &["user", "list"][..],
                "keel: etcdserverpb.Auth/UserList is not implemented yet",
            ),
            (
                &["role", "list"],
                "keel: etcdserverpb.Auth/RoleList is not implemented yet",
            ),
        ] {
            let (success, out, err) = etcdctl(ep, args, None);
            assert!(!success, "{args:?}: {out}");
            let said = out + &err;
            assert!(
                said.contains(&format!("code = Unimplemented desc = {rpc}")),
                "{args:?}: {said}"
            );
            assert!(!said.contains("PROTOCOL_ERROR"), "{said}");
        }
    });
}

/// `etcdctl endpoint hashkv` gives etcd's own hash for the same history (before and after a
/// compaction, at a past revision), and the same hash after keel restarts.
#[test]
fn hashkv_equals_etcds_for_the_same_history_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(LiveEtcd::start(dir.path()));
    let mut k = Keel::start(dir.path(), &[]);
    let hashkv = |ep: &str, rev: &str| {
        let v = json(ep, &["endpoint", "hashkv", "--rev", rev]);
        let h = &v[0]["HashKV"];
        (h["hash"].as_u64().unwrap(), h["compact_revision"].as_i64())
    };
    let eps = [etcd.endpoint(), k.url()];
    let both = |args: &[&str]| {
        for ep in &eps {
            ok(ep, args);
        }
    };
    let same = |rev: &str| {
        let (e, kk) = (hashkv(&eps[0], rev), hashkv(&eps[1], rev));
        assert_eq!(kk, e, "keel vs etcd at --rev {rev}");
        e
    };
    same("0");
    for (key, val) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "")] {
        both(&["put", key, val]);
    }
    both(&["del", "b"]);
    both(&["put", "d", "x"]);
    let before = same("0");
    same("3");
    both(&["compact", "4"]);
    let after = same("0");
    assert_ne!(before, after, "a compaction changes the hash, as in etcd");
    same("5");
    k.restart();
    assert_eq!(
        hashkv(&k.url(), "0"),
        after,
        "the same hash after a restart"
    );
}

/// The quota flow of etcd's docs, as etcdctl shows it: writes past --quota-backend-bytes
/// raise NOSPACE and fail with etcd's message; reads, deletes, read-only txns and compaction
/// go on; defrag shrinks the file; after `alarm disarm` writes work again.
#[test]
fn nospace_alarm_compact_defrag_and_disarm() {
    each_endpoint_form(&["--quota-backend-bytes", "16777216"], |k, ep| {
        let value = "v".repeat(100_000);
        let mut failed = None;
        for i in 0..400 {
            let (success, _, err) = etcdctl(ep, &["put", &format!("key{i}")], Some(&value));
            if !success {
                failed = Some(err);
                break;
            }
        }
        let err = failed.expect("a 16 MiB quota is reached within 40 MB of puts");
        assert!(
            err.contains("Error: etcdserver: mvcc: database space exceeded"),
            "{err}"
        );
        let id = json(ep, &["endpoint", "status"])[0]["Status"]["header"]["member_id"]
            .as_u64()
            .unwrap();
        let alarm = format!("memberID:{id} alarm:NOSPACE ");
        assert_eq!(ok(ep, &["alarm", "list"]), format!("{alarm}\n"));
        let st = json(ep, &["endpoint", "status"]);
        assert_eq!(st[0]["Status"]["errors"][0], alarm.as_str());
        let (success, _, err) = etcdctl(ep, &["put", "small", "v"], None);
        assert!(!success && err.contains("database space exceeded"), "{err}");
        // What does not grow the store still works.
        assert_eq!(ok(ep, &["get", "key1", "--keys-only"]), "key1\n\n");
        assert_eq!(ok(ep, &["del", "key1"]), "1\n");
        let (success, out, _) = etcdctl(ep, &["txn"], Some("\nget key2 --keys-only\n\n\n"));
        assert!(success && out.starts_with("SUCCESS"), "{out}");
        let (success, _, err) = etcdctl(ep, &["txn"], Some("\nput key2 x\n\n\n"));
        assert!(!success && err.contains("database space exceeded"), "{err}");
        for i in 3..80 {
            ok(ep, &["del", &format!("key{i}")]);
        }
        let rev = json(ep, &["get", "key2"])["header"]["revision"]
            .as_i64()
            .unwrap();
        ok(ep, &["compact", &rev.to_string()]);
        let size = |ep: &str| db_size(ep);
        let before = size(ep);
        assert_eq!(
            ok(ep, &["defrag"]),
            format!("Finished defragmenting etcd member[{ep}]\n")
        );
        let after = size(ep);
        assert!(
            after < before,
            "defrag shrinks the file: {before} -> {after}"
        );
        // The alarm stays until disarmed.
        assert_eq!(ok(ep, &["alarm", "list"]), format!("{alarm}\n"));
        assert_eq!(ok(ep, &["alarm", "disarm"]), format!("{alarm}\n"));
        assert_eq!(ok(ep, &["alarm", "list"]), "");
        assert_eq!(ok(ep, &["alarm", "disarm"]), "");
        assert_eq!(ok(ep, &["put", "small", "v"]), "OK\n");
        let st = json(ep, &["endpoint", "status"]);
        assert!(st[0]["Status"].get("errors").is_none(), "{st}");
        let _ = k;
    });
}

/// `--auto-compaction-retention 1s` (periodic mode, etcd's default): about a second after
/// start keel compacts to the revision it saw a second earlier, and keeps doing so.
#[test]
fn periodic_auto_compaction_compacts_old_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start(dir.path(), &["--auto-compaction-retention", "1s"]);
    let ep = k.endpoint();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut i = 0;
    loop {
        ok(&ep, &["put", "a", &i.to_string()]);
        i += 1;
        let (success, _, err) = etcdctl(&ep, &["get", "a", "--rev=2"], None);
        if !success {
            assert!(
                err.contains("required revision has been compacted"),
                "{err}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no auto-compaction in 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(k.log_text().contains("completed auto-compaction"));
    // The latest value is still there.
    assert_eq!(
        ok(&ep, &["get", "a", "--print-value-only"]),
        format!("{}\n", i - 1)
    );
}
