//! `Cluster`: N `keel` processes on 127.0.0.1..N, each with its own data dir, client port and
//! peer port. Members advertise a proxy in front of their peer port, so a test can partition
//! them: the proxy reads the hello that opens every peer connection (it names both members)
//! and cuts or refuses the connections of a blocked pair. Members can be killed (SIGKILL),
//! paused (SIGSTOP), resumed and restarted.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TOKEN: &str = "keel-test-cluster";

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Member {
    pub name: String,
    pub ip: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub proxy_port: u16,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.client_port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.endpoint())
    }

    /// The peer URL the cluster knows this member by (its proxy).
    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.proxy_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// Pairs of member IDs whose traffic the proxies drop.
type Blocked = Arc<Mutex<HashSet<(u64, u64)>>>;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    pub initial_cluster: String,
    extra: Vec<String>,
    blocked: Blocked,
    /// Runs the proxies.
    _proxy_rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts `n` members (names m1..mn on 127.0.0.1..n) and waits until they serve and
    /// agree on a leader.
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, |_| {})
    }

    /// `start`, with `prepare` run on the members' dirs before any starts (to restore a
    /// snapshot into them, say).
    pub fn start_with(n: usize, extra: &[&str], prepare: impl FnOnce(&Cluster)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let proxy_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let blocked: Blocked = Arc::default();
        let mut members = Vec::new();
        for i in 1..=n {
            members.push(new_member(dir.path(), i, &proxy_rt, &blocked));
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            members,
            initial_cluster,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            blocked,
            _proxy_rt: proxy_rt,
        };
        prepare(&c);
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_serving(i);
        }
        c.wait_leader(Duration::from_secs(20));
        c
    }

    /// A new member's ports and proxy (not started: add it with etcdctl first, then
    /// `spawn_joining`).
    pub fn new_member(&mut self) -> usize {
        let i = self.members.len() + 1;
        let m = new_member(self.dir.path(), i, &self._proxy_rt, &self.blocked);
        self.initial_cluster = format!("{},{}={}", self.initial_cluster, m.name, m.peer_url());
        self.members.push(m);
        i - 1
    }

    /// Starts member `i` as etcd's guide does for a member added at runtime
    /// (`--initial-cluster-state existing`), and waits until it serves.
    pub fn spawn_joining(&mut self, i: usize) {
        let saved = self.extra.clone();
        self.extra.extend([
            "--initial-cluster-state".to_string(),
            "existing".to_string(),
        ]);
        self.spawn(i);
        self.extra = saved;
        self.wait_serving(i);
    }

    /// Waits up to `limit` for member `i` to exit by itself; its status.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let m = &mut self.members[i];
            if let Some(status) = m.child.as_mut()?.try_wait().unwrap() {
                m.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.url()])
            .args(["--advertise-client-urls", &m.url()])
            .args([
                "--listen-peer-urls",
                &format!("http://{}:{}", m.ip, m.peer_port),
            ])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", TOKEN])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        m.child = Some(child);
    }

    /// Waits until member `i` answers Status.
    pub fn wait_serving(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let rt = rt();
        loop {
            let m = &mut self.members[i];
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                panic!("{} exited ({status}):\n{}", m.name, m.log_text());
            }
            if rt.block_on(status_of(&m.url())).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve in 30 s:\n{}",
                m.name,
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Member `i`'s Status, if it answers within 500 ms.
    pub fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        if !self.members[i].running() {
            return None;
        }
        rt().block_on(status_of(&self.members[i].url()))
    }

    pub fn member_id(&self, i: usize) -> u64 {
        self.status(i)
            .and_then(|s| s.header)
            .map(|h| h.member_id)
            .expect("member answers status")
    }

    /// The index of the member every running member (among `among`) names as leader, once
    /// they agree.
    pub fn leader_among(&self, among: &[usize]) -> Option<usize> {
        let mut leader = None;
        for &i in among {
            let s = self.status(i)?;
            if s.leader == 0 {
                return None;
            }
            match leader {
                None => leader = Some(s.leader),
                Some(l) if l != s.leader => return None,
                _ => {}
            }
        }
        let leader = leader?;
        among.iter().copied().find(|&i| {
            self.status(i)
                .and_then(|s| s.header)
                .is_some_and(|h| h.member_id == leader)
        })
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].running())
            .collect()
    }

    /// Waits until the running members agree on a leader among them.
    pub fn wait_leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.leader_among(&self.running()) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader in {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = m.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}\n", m.name, tail.join("\n"))
            })
            .collect()
    }

    /// SIGKILL member `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data, without waiting for it to serve.
    pub fn start_again(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
    }

    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
        self.wait_serving(i);
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        let pid = self.members[i].child.as_ref().expect("running").id();
        // SAFETY: signals a child process this harness started.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }

    /// SIGTERM: the member stops as systemd stops it.
    pub fn terminate(&self, i: usize) {
        self.signal(i, libc::SIGTERM);
    }

    /// SIGSTOP: the member stops dead, its sockets open.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// Cuts every peer connection between `side` and the other members (both directions).
    pub fn isolate(&self, side: &[usize]) {
        let ids: Vec<u64> = (0..self.members.len())
            .map(|i| crate::harness::id_of(&self.members[i]))
            .collect();
        let mut b = self.blocked.lock().unwrap();
        for &i in side {
            for j in 0..self.members.len() {
                if !side.contains(&j) {
                    b.insert((ids[i], ids[j]));
                    b.insert((ids[j], ids[i]));
                }
            }
        }
    }

    pub fn heal(&self) {
        self.blocked.lock().unwrap().clear();
    }

    /// HashKV of every running member at the same revision, once they all applied it.
    pub fn hash_kvs(&self) -> Vec<u32> {
        let rt = rt();
        let running = self.running();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let revs: Vec<i64> = running
                .iter()
                .filter_map(|&i| self.status(i).and_then(|s| s.header).map(|h| h.revision))
                .collect();
            let settled = revs.len() == running.len() && revs.iter().all(|r| *r == revs[0]);
            if settled {
                let rev = revs[0];
                return running
                    .iter()
                    .map(|&i| {
                        rt.block_on(async {
                            let mut c = pb::maintenance_client::MaintenanceClient::connect(
                                self.members[i].url(),
                            )
                            .await
                            .unwrap();
                            c.hash_kv(pb::HashKvRequest { revision: rev })
                                .await
                                .unwrap()
                                .into_inner()
                                .hash
                        })
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge: revisions {revs:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].running() {
                // A paused member must be resumed to die cleanly.
                self.resume(i);
            }
            self.kill9(i);
        }
    }
}

fn new_member(
    dir: &std::path::Path,
    i: usize,
    proxy_rt: &tokio::runtime::Runtime,
    blocked: &Blocked,
) -> Member {
    let ip = format!("127.0.0.{i}");
    let l = TcpListener::bind((ip.as_str(), 0)).unwrap();
    let m = Member {
        name: format!("m{i}"),
        client_port: free_port(&ip),
        peer_port: free_port(&ip),
        proxy_port: l.local_addr().unwrap().port(),
        data_dir: dir.join(format!("m{i}.keel")),
        log: dir.join(format!("m{i}.log")),
        ip,
        child: None,
    };
    let target = format!("{}:{}", m.ip, m.peer_port);
    proxy_rt.spawn(proxy(l, target, blocked.clone()));
    m
}

/// A member's ID as etcd (and Keel) derive it: from its peer URL and the cluster token.
pub fn id_of(m: &Member) -> u64 {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(m.peer_url().as_bytes());
    h.update(TOKEN.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn status_of(url: &str) -> Option<pb::StatusResponse> {
    let t = Duration::from_millis(500);
    let mut c = tokio::time::timeout(
        t,
        pb::maintenance_client::MaintenanceClient::connect(url.to_string()),
    )
    .await
    .ok()?
    .ok()?;
    let r = tokio::time::timeout(t, c.status(pb::StatusRequest {}))
        .await
        .ok()?
        .ok()?;
    Some(r.into_inner())
}

/// Forwards peer connections to `target` unless the hello names a blocked pair; cuts live
/// connections of a pair once it is blocked.
async fn proxy(l: TcpListener, target: String, blocked: Blocked) {
    l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            continue;
        };
        let (target, blocked) = (target.clone(), blocked.clone());
        tokio::spawn(async move {
            let mut hello = [0u8; 36];
            if inbound.read_exact(&mut hello).await.is_err() {
                return;
            }
            let from = u64::from_le_bytes(hello[20..28].try_into().unwrap());
            let to = u64::from_le_bytes(hello[28..36].try_into().unwrap());
            let cut = || blocked.lock().unwrap().contains(&(from, to));
            if cut() {
                return;
            }
            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            if outbound.write_all(&hello).await.is_err() {
                return;
            }
            let (mut ri, mut wi) = inbound.split();
            let (mut ro, mut wo) = outbound.split();
            let mut a = [0u8; 64 * 1024];
            let mut b = [0u8; 4096];
            let mut check = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    n = ri.read(&mut a) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if cut() || wo.write_all(&a[..n]).await.is_err() { return },
                    },
                    n = ro.read(&mut b) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if wi.write_all(&b[..n]).await.is_err() { return },
                    },
                    _ = check.tick() => if cut() { return },
                }
            }
        });
    }
}
