//! The keel binary's flags and config file as an operator meets them.

use std::process::Command;

use crate::harness::{etcdctl, free_port, Keel};

/// Runs `keel` as configured, and returns `etcdctl member list` once it answers on port `port`
/// (up to 10 s; empty if it never does). The process is killed before returning.
fn member_list_of(keel: &mut Command, port: u16) -> String {
    let mut child = keel.stderr(std::process::Stdio::null()).spawn().unwrap();
    let ep = format!("127.0.0.1:{port}");
    let mut listed = String::new();
    for _ in 0..200 {
        let (ok, out, _) = etcdctl(&ep, &["member", "list"], None);
        if ok {
            listed = out;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    listed
}

#[test]
fn version_flag_prints_keels_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(&format!("keel Version: {}\n", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("etcd API Version: 3.6.0"));
}

#[test]
fn unknown_flag_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--frobnicate=1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--frobnicate"), "{err}");
}

#[test]
fn etcd_sample_yaml_starts_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let (port, peer) = (free_port(), free_port());
    let data = dir.path().join("etcd-data");
    // etcd's documented sample, with the data dir and ports moved onto this test's.
    let yaml = format!(
        "name: node1\ndata-dir: {}\nlisten-client-urls: http://127.0.0.1:{port}\n\
         advertise-client-urls: http://192.168.1.10:2379\n\
         listen-peer-urls: http://0.0.0.0:{peer}\n\
         initial-advertise-peer-urls: http://192.168.1.10:2380\n",
        data.display()
    );
    let cfg = dir.path().join("etcd.conf.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let listed = member_list_of(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("--config-file")
            .arg(&cfg),
        port,
    );
    assert!(
        listed.contains("node1, http://192.168.1.10:2380, http://192.168.1.10:2379"),
        "{listed}"
    );
    assert!(
        data.join("member").join("wal").is_dir(),
        "data-dir from the YAML is used"
    );

    std::fs::write(&cfg, "name: x\nno-such-key: 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--config-file")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-key"));
}

#[test]
fn etcd_environment_variables_configure_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listed = member_list_of(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .env("ETCD_NAME", "envnode")
            .env("ETCD_DATA_DIR", dir.path().join("d"))
            .env("ETCD_LISTEN_CLIENT_URLS", &url)
            .env("ETCD_ADVERTISE_CLIENT_URLS", &url)
            .env(
                "ETCD_LISTEN_PEER_URLS",
                format!("http://127.0.0.1:{}", free_port()),
            ),
        port,
    );
    assert!(listed.contains(", envnode, "), "{listed}");
}

/// A systemd `Type=notify` unit (the deployment guide's) waits for READY=1 on
/// NOTIFY_SOCKET, sent once keel serves.
#[test]
fn tells_systemd_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let sock_env = sock_path.to_str().unwrap();
    let k = Keel::start_env(dir.path(), &[], &[("NOTIFY_SOCKET", sock_env)]);
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    let (ok, _, err) = etcdctl(&k.endpoint(), &["put", "a", "1"], None);
    assert!(ok, "{err}");
}
