//! keel-bench against a real etcd 3.4 (the harness is a black-box etcd client): it counts
//! errors by code and message, keeps going when the endpoint dies, and its --json is complete.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl(ep: &str, args: &[&str]) -> bool {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", ep, "--dial-timeout", "1s"])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh single-node etcd on free loopback ports. scripts/setup.sh installs etcd: a
/// machine without it fails these tests rather than passing them unrun.
fn etcd() -> Etcd {
    assert!(
        Command::new("etcd").arg("--version").output().is_ok(),
        "etcd is not installed: run scripts/setup.sh (these tests drive a live etcd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (c, p) = (free_port(), free_port());
    let (curl, purl) = (
        format!("http://127.0.0.1:{c}"),
        format!("http://127.0.0.1:{p}"),
    );
    let child = Command::new("etcd")
        .args(["--name", "h", "--data-dir"])
        .arg(dir.path().join("h.etcd"))
        .args([
            "--listen-client-urls",
            &curl,
            "--advertise-client-urls",
            &curl,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args(["--initial-cluster", &format!("h={purl}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("127.0.0.1:{c}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&endpoint, &["endpoint", "health"]) {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Etcd {
        child,
        endpoint,
        _dir: dir,
    }
}

fn bench(ep: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel-bench"));
    c.args(["--endpoints", ep, "--json"]).args(args);
    c
}

fn json(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn counts_compacted_revision_errors_with_etcds_message() {
    let e = etcd();
    for v in ["1", "2", "3"] {
        assert!(etcdctl(&e.endpoint, &["put", "k", v]));
    }
    assert!(etcdctl(&e.endpoint, &["compact", "4"]));
    let out = bench(&e.endpoint, &["range", "k", "--rev", "2", "--total", "50"])
        .output()
        .unwrap();
    let v = json(out);
    assert_eq!(v["requests"], 0);
    assert_eq!(v["error_count"], 50);
    assert_eq!(
        v["errors"]["OutOfRange: etcdserver: mvcc: required revision has been compacted"],
        50
    );
}

#[test]
fn json_is_complete_and_counts_match() {
    let e = etcd();
    let out = bench(
        &e.endpoint,
        &[
            "--conns",
            "2",
            "--clients",
            "4",
            "put",
            "--total",
            "300",
            "--val-size",
            "64",
        ],
    )
    .output()
    .unwrap();
    let v = json(out);
    assert_eq!(v["requests"], 300);
    assert_eq!(v["writes"], 300);
    assert_eq!(v["error_count"], 0);
    assert!(v["requests_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["client_cpu_cores"].as_f64().unwrap() >= 0.0);
    let l = &v["latency_ms"];
    let (p50, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{l}");
    // etcd agrees that 300 puts happened: revision 1 + 300.
    let rev = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &e.endpoint, "get", "x", "-w", "json"])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&rev.stdout).unwrap();
    assert_eq!(r["header"]["revision"], 301);
}

#[test]
fn a_stopped_endpoint_is_counted_not_fatal() {
    let mut e = etcd();
    let child = bench(
        &e.endpoint,
        &[
            "--duration",
            "2",
            "--rate",
            "200",
            "put",
            "--val-size",
            "16",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    e.child.kill().unwrap();
    e.child.wait().unwrap();
    let v = json(child.wait_with_output().unwrap());
    let ok = v["requests"].as_u64().unwrap();
    let failed = v["error_count"].as_u64().unwrap();
    assert!(ok > 50, "requests before the stop were measured: {v}");
    assert!(
        failed > 0,
        "requests after the stop were counted as errors: {v}"
    );
    let errors = v["errors"].as_object().unwrap();
    assert!(errors.keys().all(|k| k.starts_with("Unavailable")), "{v}");
}
