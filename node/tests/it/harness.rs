//! Starts, kills and restarts `keel` processes on 127.0.0.1 with their own data dirs.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_proto::pb;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Keel {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Its peer port (etcd binds one even alone; tests run side by side).
    pub peer_port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Keel {
    /// Starts keel with its data in `dir` on a free 127.0.0.1 port and waits until it serves.
    pub fn start(dir: &Path, extra: &[&str]) -> Keel {
        Keel::start_env(dir, extra, &[])
    }

    /// `start` with extra environment variables for keel.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Keel {
        let mut k = Keel {
            child: None,
            data_dir: dir.join("data.keel"),
            port: free_port(),
            peer_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: dir.join("keel.log"),
        };
        // A port picked free can be taken by a parallel test before keel binds it.
        for _ in 0..5 {
            match k.try_spawn() {
                Ok(()) => return k,
                Err(log) if log.contains("address already in use") => {
                    k.port = free_port();
                    k.peer_port = free_port();
                }
                Err(log) => panic!("keel exited during start:\n{log}"),
            }
        }
        panic!("no free port after 5 tries");
    }

    /// `start` from async tests (it blocks while keel replays its WAL and comes up).
    pub async fn start_async(dir: &Path, extra: &[&str]) -> Keel {
        let dir = dir.to_path_buf();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Keel::start(&dir, &extra)
        })
        .await
        .expect("start keel")
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("keel exited during start:\n{log}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.arg("--data-dir").arg(&self.data_dir).args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ]);
        if !self
            .extra
            .iter()
            .any(|a| a.starts_with("--listen-peer-urls"))
        {
            cmd.arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{}",
                self.peer_port
            ));
        }
        let child = cmd
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        self.child = Some(child);
        self.wait_ready()
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = self.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("({status}) {}", self.log_text()));
            }
            let ok = rt.block_on(async {
                let Ok(Ok(mut c)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    pb::maintenance_client::MaintenanceClient::connect(url.clone()),
                )
                .await
                else {
                    return false;
                };
                matches!(
                    tokio::time::timeout(
                        Duration::from_millis(500),
                        c.status(pb::StatusRequest {})
                    )
                    .await,
                    Ok(Ok(_))
                )
            });
            if ok {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "keel did not serve in 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for keel to exit by itself; its status, or None if still running.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    #[allow(dead_code)] // the failpoints binary's
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Drops the extra environment (fail points) for the next restart.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    #[allow(dead_code)] // the failpoints binary's
    pub fn clear_env(&mut self) {
        self.env.clear();
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs etcdctl (API v3) against `endpoint`, with optional stdin; returns (ok, stdout, stderr).
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl on PATH (scripts/setup.sh installs Debian's etcd-client)");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A connected gRPC channel to `url`.
pub async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn kv(url: &str) -> pb::kv_client::KvClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_lazy();
    // Like etcd's Go client, accept large responses (a full range of a big store).
    pb::kv_client::KvClient::new(ch).max_decoding_message_size(usize::MAX)
}

/// One txn that puts every (key, value), in order.
pub async fn txn_put(
    c: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
    kvs: impl IntoIterator<Item = (bytes::Bytes, bytes::Bytes)>,
) -> pb::TxnResponse {
    let success = kvs
        .into_iter()
        .map(|(key, value)| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key,
                value,
                ..Default::default()
            })),
        })
        .collect();
    c.txn(pb::TxnRequest {
        success,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// A real etcd (Debian's 3.4) on free loopback ports, for side-by-side checks. scripts/setup.sh
/// installs it: a machine without it fails the tests that use it rather than skip them.
pub struct LiveEtcd {
    child: Child,
    pub url: String,
}

impl LiveEtcd {
    pub async fn start(dir: &Path) -> LiveEtcd {
        LiveEtcd::start_with(dir, &[]).await
    }

    /// With extra etcd flags.
    pub async fn start_with(dir: &Path, extra: &[&str]) -> LiveEtcd {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd is not installed: run scripts/setup.sh (this test compares with a live etcd)"
        );
        let (cport, pport) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{cport}");
        let purl = format!("http://127.0.0.1:{pport}");
        let child = Command::new("etcd")
            .args(["--name", "ref", "--data-dir"])
            .arg(dir.join("ref.etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &purl,
                "--initial-advertise-peer-urls",
                &purl,
            ])
            .args(["--initial-cluster", &format!("ref={purl}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = LiveEtcd { child, url };
        for _ in 0..200 {
            let mut c = kv(&etcd.url);
            let probe = pb::RangeRequest {
                key: bytes::Bytes::from_static(b"x"),
                ..Default::default()
            };
            if c.range(probe).await.is_ok() {
                return etcd;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not start");
    }

    pub fn endpoint(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }
}

impl Drop for LiveEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
