//! Start-up against damaged or unusual data dirs, and the --cores layouts.

use std::process::Command;

use bytes::Bytes;
use keel_proto::pb;

use crate::harness::{free_port, kv, Keel};

/// Runs keel on `data_dir`, listening on `listen`, to completion (it is expected to refuse).
fn keel_output(data_dir: &std::path::Path, listen: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", listen])
        .arg(format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            crate::harness::free_port()
        ))
        .output()
        .unwrap()
}

/// A flipped bit in a WAL record that is followed by good records is corruption: keel must
/// refuse to start and name the segment file and the record's offset.
#[test]
fn corrupted_wal_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut k = Keel::start(dir.path(), &[]);
    let (ok, _, err) = crate::harness::etcdctl(&k.endpoint(), &["put", "a", "1"], None);
    assert!(ok, "{err}");
    for i in 0..5 {
        crate::harness::etcdctl(&k.endpoint(), &["put", "k", &i.to_string()], None);
    }
    k.kill9();
    let wal_dir = k.data_dir.join("member").join("wal");
    let seg = wal_dir.join("0000000000000000.wal");
    let mut bytes = std::fs::read(&seg).unwrap();
    // Walk the record headers (len at 0..4, log2 alignment at 9) to the third record (the
    // member meta, then two batches) and flip a payload bit in it.
    let span = |pos: usize| {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let align = 1usize << bytes[pos + 9];
        (24 + len).div_ceil(align) * align
    };
    let second = span(0);
    let third = second + span(second);
    bytes[third + 40] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let out = keel_output(&k.data_dir, &format!("http://127.0.0.1:{}", free_port()));
    assert!(!out.status.success(), "keel started on a corrupted WAL");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wal corrupted"), "{err}");
    assert!(
        err.contains(&format!("{} at offset {third}", seg.display())),
        "{err}"
    );
}

/// etcd refuses a client address another process listens on; SO_REUSEPORT must not let a
/// second keel join the first one's port.
#[test]
fn a_taken_client_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start(dir.path(), &[]);
    let other = tempfile::tempdir().unwrap();
    let out = keel_output(&other.path().join("d"), &k.url());
    assert!(
        !out.status.success(),
        "a second keel started on a taken port"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "listen tcp {}: bind: address already in use",
            k.endpoint()
        )),
        "{err}"
    );
}

/// etcd binds its peer port at start even when it is alone, and refuses one another process
/// holds, before it touches its data dir's state.
#[test]
fn a_taken_peer_port_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start(dir.path(), &[]);
    let other = tempfile::tempdir().unwrap();
    let mut out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--data-dir")
        .arg(other.path().join("d"))
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .arg(format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            k.peer_port
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while out.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = out.kill();
            panic!("a second keel runs on a taken peer port");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = out.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "listen tcp 127.0.0.1:{}: bind: address already in use",
            k.peer_port
        )),
        "{err}"
    );
    assert!(
        !other.path().join("d/member/wal").exists(),
        "no WAL made before the ports are bound"
    );
}

#[test]
fn two_processes_cannot_share_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start(dir.path(), &[]);
    let out = keel_output(&k.data_dir, &format!("http://127.0.0.1:{}", free_port()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another keel process"));
}

/// `--cores 4` (one raft core, three net cores, each with its own SO_REUSEPORT listener)
/// serves every connection, and writes made through any core are read through any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_core_layout_serves_all_connections() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &["--cores", "4"]).await;
    let mut tasks = Vec::new();
    for c in 0..12 {
        let url = k.url();
        tasks.push(tokio::spawn(async move {
            // A fresh channel each: a new TCP connection, hashed onto some net core.
            let mut client = kv(&url);
            for i in 0..20 {
                client
                    .put(pb::PutRequest {
                        key: Bytes::from(format!("c{c}/{i}")),
                        value: Bytes::from_static(b"v"),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut reader = kv(&k.url());
    let r = reader
        .range(pb::RangeRequest {
            key: Bytes::from_static(b"c"),
            range_end: Bytes::from_static(b"d"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 240);
    assert_eq!(r.header.unwrap().revision, 241);
    let threads = std::fs::read_dir(format!("/proc/{}/task", k.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.starts_with("keel-net-"))
        .count();
    assert_eq!(threads, 3, "one raft core and three net cores");
}

/// Snapshots release the WAL: with small segments and a small --snapshot-count, the WAL stays
/// a few segments however much is written, and a member killed with -9 comes back from its
/// backend plus what is left of the WAL, with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_is_released_after_snapshots_and_restart_uses_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--snapshot-count",
        "200",
        "--experimental-snapshot-catchup-entries",
        "100",
        "--wal-segment-bytes",
        "65536",
    ];
    let mut k = Keel::start_async(dir.path(), &args).await;
    let wal_dir = k.data_dir.join("member").join("wal");
    let mut c = kv(&k.url());
    let value = Bytes::from(vec![b'v'; 300]);
    let mut max_segments = 0;
    for i in 0..3000u32 {
        c.put(pb::PutRequest {
            key: Bytes::from(format!("k{:04}", i % 700)),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("put {i}: {e}\n{}", k.log_text()));
        if i % 250 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            let n = keel_storage::wal::list_segments(&wal_dir).unwrap().len();
            max_segments = max_segments.max(n);
        }
    }
    // ~3000 x 350 B of WAL is ~16 segments of 64 KiB; released, a handful remain.
    assert!(max_segments <= 8, "wal kept {max_segments} segments");
    assert!(k.log_text().contains("released wal"), "{}", k.log_text());
    let k = tokio::task::spawn_blocking(move || {
        k.kill9();
        k.restart();
        k
    })
    .await
    .unwrap();
    let log = k.log_text();
    assert!(log.contains("opened backend"), "{log}");
    let mut c = kv(&k.url());
    let all = c
        .range(pb::RangeRequest {
            key: Bytes::from_static(b"k"),
            range_end: Bytes::from_static(b"l"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.count, 700);
    assert_eq!(all.header.unwrap().revision, 3001);
    assert!(all.kvs.iter().all(|kv| kv.value == value));
    let k0 = &all.kvs[0];
    assert_eq!(
        (k0.create_revision, k0.version),
        (2, 5),
        "k0000 written 5 times"
    );
}
