//! The peer transport: how members of one cluster carry frames (raft messages, forwarded
//! lease calls) to each other. It knows nothing of what a frame holds.
//!
//! Each member dials every peer once and keeps that connection for its own frames to it (so
//! between two members there are two connections, one per direction, as etcd's stream
//! transport). A connection starts with a hello naming the cluster and both ends; a hello from
//! another cluster, or meant for another member, is refused and logged. Then frames follow,
//! each `u32 length (LE) | payload`.
//!
//! Sending never blocks the caller: each peer has a bounded queue, and a frame that finds it
//! full is dropped (raft retries). A writer task drains the queue, writes everything waiting
//! in one go and reconnects with a backoff when the connection breaks, telling the receiver
//! side (`Inbound::unreachable`) so raft probes the peer instead of streaming into the void.
//!
//! ```text
//! hello:  b"KEELPEER" | u32 kind | u64 cluster_id | u64 from | u64 to   (all LE)
//! frame:  u32 len | len bytes
//! ```
//!
//! A member refuses a hello from a member removed from the cluster with one byte, `GONE`,
//! and closes the connection (etcd's peers answer such a member 410 Gone); the removed
//! member learns it so (`Inbound::removed`) and stops. No other byte ever flows back on a
//! frames connection.
//!
//! A connection of kind 1 carries frames for as long as it lives. One of kind 2 carries one
//! stream (a whole state sent to a member far behind, on a connection of its own so the
//! heartbeats never wait behind it): frames, then `u32 0xffffffff`; the receiver answers one
//! byte, 1 if it took the stream whole, then the connection closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const MAGIC: &[u8; 8] = b"KEELPEER";
const KIND_FRAMES: u32 = 1;
const KIND_STREAM: u32 = 2;
/// A query from a member that does not know its ID yet (joining an existing cluster): the
/// hello's IDs are zero; the answer is one frame, then the connection closes.
const KIND_QUERY: u32 = 3;
const STREAM_END: u32 = u32::MAX;
/// The answer to a hello from a member removed from the cluster.
const GONE: u8 = b'G';
/// How long a sender waits for the receiver to write a whole stream down.
const STREAM_ACK_TIMEOUT: Duration = Duration::from_secs(300);
const HELLO_BYTES: usize = 8 + 4 + 8 + 8 + 8;
/// Frames waiting for one peer at most; beyond, new ones are dropped.
pub const QUEUE_FRAMES: usize = 8192;
/// The largest frame a reader accepts (a raft append of `max_size_per_msg` plus headroom, a
/// snapshot chunk).
pub const FRAME_BYTES_MAX: usize = 64 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the transport hands to the member: frames from peers, and peers it lost.
pub trait Inbound: Send + Sync + 'static {
    /// A frame from member `from` (called on the transport's runtime: must not block).
    fn frame(&self, from: u64, frame: Bytes);
    /// The connection to `peer` broke or could not be made; frames to it were lost.
    fn unreachable(&self, peer: u64);
    /// A stream from `from`: `next` yields its frames until it ends (None). Called on a
    /// blocking thread; whether the stream was taken whole.
    fn receive_stream(&self, from: u64, next: &mut dyn FnMut() -> Option<Bytes>) -> bool {
        let _ = (from, next);
        false
    }
    /// The answer to a peer query (what the cluster looks like).
    fn query(&self) -> Bytes {
        Bytes::new()
    }
    /// Whether `peer` was removed from the cluster (its connections are refused with `GONE`).
    fn is_removed(&self, peer: u64) -> bool {
        let _ = peer;
        false
    }
    /// A peer refused this member as removed from the cluster.
    fn removed(&self) {}
    /// Whether the member reads frames connections itself (`adopt`) instead of having the
    /// transport's runtime read them and call `frame`.
    fn adopts(&self) -> bool {
        false
    }
    /// A frames connection from a peer, handed over once its hello checked out (only when
    /// `adopts`). Dropping it closes the connection; the peer dials again.
    fn adopt(&self, link: Adopted) {
        drop(link);
    }
}

/// A frames connection from a peer that the member reads on a thread of its own: the raft
/// core waits on the socket itself, so a message from a peer does not cross a thread before
/// raft sees it. Nonblocking; frames as on any link.
pub struct Adopted {
    from: u64,
    stream: std::net::TcpStream,
    buf: BytesMut,
    scratch: Vec<u8>,
    /// When this link last noted activity (`Peers::note_heard`).
    noted: Option<std::time::Instant>,
    peers: Arc<Peers>,
}

impl Adopted {
    pub fn from(&self) -> u64 {
        self.from
    }

    /// Tells the peer it was removed from the cluster (`GONE`, as to a hello from it); the
    /// caller then drops the link.
    pub fn tell_removed(&self) {
        use std::io::Write;
        let _ = (&self.stream).write(&[GONE]);
    }

    /// Reads everything the socket holds now and hands each whole frame to `each` (empty
    /// keep-alive frames are not handed on). False once the connection is closed, broken or
    /// sent an oversized frame: the caller drops it.
    pub fn read(&mut self, each: &mut dyn FnMut(Bytes)) -> bool {
        use std::io::Read;
        loop {
            match self.stream.read(&mut self.scratch) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            self.peers.note_heard(self.from, &mut self.noted);
            if !hand_frames(&mut self.buf, self.from, each) {
                return false;
            }
        }
    }

    /// Hands a frame the member does not handle on its own thread to `Inbound::frame`, on
    /// the transport's runtime.
    pub fn pass(&self, frame: Bytes) {
        let (peers, from) = (self.peers.clone(), self.from);
        self.peers
            .rt
            .spawn(async move { peers.inbound.frame(from, frame) });
    }
}

impl std::os::fd::AsRawFd for Adopted {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        self.peers.link_from(self.from, false);
    }
}

/// Asks the members at `urls` (the first that answers) what the cluster looks like.
pub async fn query(urls: &[String]) -> Option<Bytes> {
    for u in urls {
        let ask = async {
            let mut s = dial(std::slice::from_ref(u)).await?;
            s.write_all(&hello(KIND_QUERY, 0, 0, 0)).await.ok()?;
            let mut buf = BytesMut::new();
            loop {
                if let Some(f) = take_frame(&mut buf) {
                    return f.ok();
                }
                if s.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
        };
        if let Ok(Some(answer)) = tokio::time::timeout(DIAL_TIMEOUT * 3, ask).await {
            return Some(answer);
        }
    }
    None
}

/// A peer whose links have been silent for longer than this is not active (every link sends
/// at least an empty frame every `KEEPALIVE`; the margin covers this member's own stalls).
const ACTIVE_GAP: std::time::Duration = std::time::Duration::from_secs(3);
const KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(250);

/// A peer's links to this member.
struct Heard {
    /// Since when it has had one open.
    since: std::time::Instant,
    /// When a frame last came.
    last: std::time::Instant,
    open: u32,
}

struct Link {
    tx: mpsc::Sender<Bytes>,
    urls: Vec<String>,
}

/// The member's end of the transport. Cheap to share; `send` takes no lock (the links are
/// swapped whole when the membership changes, which is rare).
pub struct Peers {
    local: u64,
    cluster: u64,
    rt: tokio::runtime::Handle,
    links: ArcSwap<HashMap<u64, Arc<Link>>>,
    /// Serialises link changes.
    changing: Mutex<()>,
    inbound: Arc<dyn Inbound>,
    /// Per peer: its links to this member.
    heard: Mutex<HashMap<u64, Heard>>,
}

impl Peers {
    /// Starts accepting peers on `listeners` (on `rt`).
    pub fn start(
        rt: tokio::runtime::Handle,
        local: u64,
        cluster: u64,
        listeners: Vec<std::net::TcpListener>,
        inbound: Arc<dyn Inbound>,
    ) -> std::io::Result<Arc<Peers>> {
        let peers = Arc::new(Peers {
            local,
            cluster,
            rt: rt.clone(),
            links: ArcSwap::from_pointee(HashMap::new()),
            changing: Mutex::new(()),
            inbound,
            heard: Mutex::new(HashMap::new()),
        });
        for l in listeners {
            l.set_nonblocking(true)?;
            let p = peers.clone();
            rt.spawn(async move {
                let l = match TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for peers");
                        return;
                    }
                };
                p.accept_loop(l).await
            });
        }
        Ok(peers)
    }

    pub fn local_id(&self) -> u64 {
        self.local
    }

    /// Starts (or re-points) the link to `peer` at `urls` (`http://host:port`).
    pub fn connect(&self, peer: u64, urls: Vec<String>) {
        let _changing = self.changing.lock().expect("peer links");
        if self.links.load().get(&peer).is_some_and(|l| l.urls == urls) {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let mut links = HashMap::clone(&self.links.load());
        links.insert(
            peer,
            Arc::new(Link {
                tx,
                urls: urls.clone(),
            }),
        );
        self.links.store(Arc::new(links));
        let hello = hello(KIND_FRAMES, self.cluster, self.local, peer);
        let inbound = self.inbound.clone();
        self.rt.spawn(write_loop(peer, urls, hello, rx, inbound));
    }

    /// Since when `peer` has had a link open to this member (etcd's transport ActiveSince,
    /// for its reconfiguration checks); None if it has none, or sent nothing for
    /// `ACTIVE_GAP` (every link sends keep-alive frames, so a live peer always does).
    pub fn active_since(&self, peer: u64) -> Option<std::time::Instant> {
        let heard = self.heard.lock().expect("peer activity");
        let h = heard.get(&peer)?;
        (h.open > 0 && h.last.elapsed() <= ACTIVE_GAP).then_some(h.since)
    }

    /// A link from `peer` opened (`open`) or closed.
    fn link_from(&self, peer: u64, open: bool) {
        let now = std::time::Instant::now();
        let mut heard = self.heard.lock().expect("peer activity");
        let h = heard.entry(peer).or_insert(Heard {
            since: now,
            last: now,
            open: 0,
        });
        if open {
            if h.open == 0 {
                h.since = now;
            }
            h.open += 1;
            h.last = now;
        } else {
            h.open = h.open.saturating_sub(1);
        }
    }

    /// Notes frames from `peer` now, at most every `KEEPALIVE` per link (`noted`: when this
    /// link last did): activity is judged over `ACTIVE_GAP`, not on every read of the
    /// replication stream.
    fn note_heard(&self, peer: u64, noted: &mut Option<std::time::Instant>) {
        if noted.is_some_and(|t| t.elapsed() < KEEPALIVE) {
            return;
        }
        *noted = Some(std::time::Instant::now());
        if let Some(h) = self.heard.lock().expect("peer activity").get_mut(&peer) {
            h.last = std::time::Instant::now();
        }
    }

    /// Stops the link to `peer` (its writer ends once its queue is dropped).
    pub fn disconnect(&self, peer: u64) {
        let _changing = self.changing.lock().expect("peer links");
        let mut links = HashMap::clone(&self.links.load());
        links.remove(&peer);
        self.links.store(Arc::new(links));
    }

    /// Whether there is a link to `peer` (it is a member).
    pub fn has_link(&self, peer: u64) -> bool {
        self.links.load().contains_key(&peer)
    }

    /// Dials `peer` for a frames connection of the caller's own (beside the link's, which
    /// stays), says hello, and hands it over nonblocking to `done`, or None if the peer
    /// could not be reached. Frames written on it are `u32 length (LE) | payload`, as on
    /// any link; the peer reads it as one more link from this member.
    pub fn dial_frames(
        &self,
        peer: u64,
        done: Box<dyn FnOnce(Option<std::net::TcpStream>) + Send>,
    ) {
        let open = self.open(peer, KIND_FRAMES);
        self.rt
            .spawn(async move { done(open.await.and_then(|s| s.into_std().ok())) });
    }

    /// Dials `peer` at its link's URLs for a connection of `kind` of its own and says hello.
    fn open(
        &self,
        peer: u64,
        kind: u32,
    ) -> impl std::future::Future<Output = Option<TcpStream>> + Send + 'static {
        let urls = self.links.load().get(&peer).map(|l| l.urls.clone());
        let hello = hello(kind, self.cluster, self.local, peer);
        async move {
            let mut s = dial(&urls?).await?;
            s.write_all(&hello).await.ok()?;
            Some(s)
        }
    }

    /// Queues a frame for `peer`; false if there is no such peer or its queue is full.
    pub fn send(&self, peer: u64, frame: Bytes) -> bool {
        match self.links.load().get(&peer) {
            Some(l) => l.tx.try_send(frame).is_ok(),
            None => false,
        }
    }

    /// Sends one stream to `peer` on a connection of its own: the frames `frames` yields
    /// until it closes, then waits for the receiver's answer; `done` learns whether the
    /// receiver took it whole. A sender that stops early (drops its end without its own end
    /// marker inside the frames) leaves a stream the receiver refuses.
    pub fn send_stream(
        &self,
        peer: u64,
        mut frames: mpsc::Receiver<Bytes>,
        done: Box<dyn FnOnce(bool) + Send>,
    ) {
        let open = self.open(peer, KIND_STREAM);
        let inbound = self.inbound.clone();
        self.rt.spawn(async move {
            let ok = async {
                let mut s = open.await?;
                let mut out = Vec::with_capacity(2 << 20);
                while let Some(f) = frames.recv().await {
                    out.clear();
                    push_frame(&mut out, &f);
                    s.write_all(&out).await.ok()?;
                }
                s.write_all(&STREAM_END.to_le_bytes()).await.ok()?;
                let mut ack = [0u8; 1];
                tokio::time::timeout(STREAM_ACK_TIMEOUT, s.read_exact(&mut ack))
                    .await
                    .ok()?
                    .ok()?;
                if ack[0] == GONE {
                    inbound.removed();
                }
                Some(ack[0] == 1)
            }
            .await
            .unwrap_or(false);
            done(ok);
        });
    }

    async fn accept_loop(self: Arc<Self>, l: TcpListener) {
        loop {
            match l.accept().await {
                Ok((s, addr)) => {
                    let p = self.clone();
                    tokio::spawn(async move { p.read_loop(s, addr).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn read_loop(self: Arc<Self>, mut s: TcpStream, addr: SocketAddr) {
        let _ = s.set_nodelay(true);
        let mut h = [0u8; HELLO_BYTES];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let Some((kind, cluster, from, to)) = parse_hello(&h) else {
            tracing::warn!(remote = %addr, "refused a peer connection: not a keel peer hello");
            return;
        };
        if kind == KIND_QUERY {
            let mut out = Vec::new();
            push_frame(&mut out, &self.inbound.query());
            let _ = s.write_all(&out).await;
            return;
        }
        if cluster != self.cluster {
            tracing::warn!(
                remote = %addr,
                remote_peer_id = format!("{from:x}"),
                remote_cluster_id = format!("{cluster:x}"),
                local_cluster_id = format!("{:x}", self.cluster),
                "refused a peer connection: request cluster ID mismatch (the peer belongs to \
                 another cluster)"
            );
            return;
        }
        if to != self.local {
            tracing::warn!(
                remote = %addr,
                remote_peer_id = format!("{from:x}"),
                local_member_id = format!("{:x}", self.local),
                requested_member_id = format!("{to:x}"),
                "refused a peer connection: it is meant for another member ID"
            );
            return;
        }
        if self.inbound.is_removed(from) {
            tracing::warn!(
                remote = %addr,
                remote_peer_id = format!("{from:x}"),
                "refused a peer connection: the peer was removed from the cluster"
            );
            let _ = s.write_all(&[GONE]).await;
            return;
        }
        if kind == KIND_STREAM {
            return self.read_stream(s, from).await;
        }
        self.link_from(from, true);
        if self.inbound.adopts() {
            match s.into_std() {
                Ok(stream) => self.inbound.adopt(Adopted {
                    from,
                    stream,
                    buf: BytesMut::with_capacity(64 * 1024),
                    scratch: vec![0; 64 * 1024],
                    noted: None,
                    peers: self.clone(),
                }),
                Err(_) => self.link_from(from, false),
            }
            return;
        }
        self.read_frames(s, from).await;
        self.link_from(from, false);
    }

    async fn read_frames(&self, mut s: TcpStream, from: u64) {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut noted: Option<std::time::Instant> = None;
        loop {
            if !buf.is_empty() {
                self.note_heard(from, &mut noted);
            }
            if !hand_frames(&mut buf, from, &mut |f| self.inbound.frame(from, f)) {
                return;
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

impl Peers {
    /// Reads one stream and hands its frames to the member on a blocking thread; answers
    /// whether it was taken whole.
    async fn read_stream(&self, mut s: TcpStream, from: u64) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let inbound = self.inbound.clone();
        let taker = tokio::task::spawn_blocking(move || {
            inbound.receive_stream(from, &mut || rx.blocking_recv())
        });
        let mut buf = BytesMut::with_capacity(2 << 20);
        let mut complete = false;
        'read: loop {
            loop {
                if buf.len() >= 4
                    && u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) == STREAM_END
                {
                    complete = true;
                    break 'read;
                }
                match take_frame(&mut buf) {
                    Some(Ok(f)) => {
                        if tx.send(f).await.is_err() {
                            break 'read;
                        }
                    }
                    Some(Err(_)) => break 'read,
                    None => break,
                }
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        drop(tx);
        let taken = taker.await.unwrap_or(false) && complete;
        let _ = s.write_all(&[taken as u8]).await;
    }
}

/// The next whole frame in `buf`, if there is one; `Err(len)` for an oversized one.
/// Hands every whole frame in `buf` (from `from`) to `each`; an empty frame only says the
/// link is alive and is not handed on. False if an oversized frame came: the link closes.
fn hand_frames(buf: &mut BytesMut, from: u64, each: &mut dyn FnMut(Bytes)) -> bool {
    while let Some(frame) = take_frame(buf) {
        match frame {
            Ok(f) if f.is_empty() => {}
            Ok(f) => each(f),
            Err(len) => {
                tracing::warn!(
                    remote_peer_id = format!("{from:x}"),
                    len,
                    "peer sent an oversized frame; closing"
                );
                return false;
            }
        }
    }
    true
}

fn take_frame(buf: &mut BytesMut) -> Option<Result<Bytes, usize>> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > FRAME_BYTES_MAX {
        return Some(Err(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return None;
    }
    let _ = buf.split_to(4);
    Some(Ok(buf.split_to(len).freeze()))
}

fn hello(kind: u32, cluster: u64, from: u64, to: u64) -> [u8; HELLO_BYTES] {
    let mut h = [0u8; HELLO_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&kind.to_le_bytes());
    h[12..20].copy_from_slice(&cluster.to_le_bytes());
    h[20..28].copy_from_slice(&from.to_le_bytes());
    h[28..36].copy_from_slice(&to.to_le_bytes());
    h
}

fn parse_hello(h: &[u8; HELLO_BYTES]) -> Option<(u32, u64, u64, u64)> {
    let kind = u32::from_le_bytes(h[8..12].try_into().ok()?);
    if &h[..8] != MAGIC || !(KIND_FRAMES..=KIND_QUERY).contains(&kind) {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().expect("8 bytes"));
    Some((kind, u(12..20), u(20..28), u(28..36)))
}

/// `host:port` of a peer URL (`http://host:port`, `https://...`, or bare).
pub fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

async fn dial(urls: &[String]) -> Option<TcpStream> {
    for u in urls {
        let addr = url_authority(u);
        if let Ok(Ok(s)) = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

/// Keeps a connection to `peer` and writes its queued frames, batching whatever waits.
async fn write_loop(
    peer: u64,
    urls: Vec<String>,
    hello: [u8; HELLO_BYTES],
    mut rx: mpsc::Receiver<Bytes>,
    inbound: Arc<dyn Inbound>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut out = Vec::with_capacity(256 * 1024);
    let mut was_up = true;
    'connect: loop {
        let Some(mut s) = dial(&urls).await else {
            if was_up {
                tracing::info!(peer = format!("{peer:x}"), ?urls, "peer unreachable");
                was_up = false;
            }
            inbound.unreachable(peer);
            // Frames queued while the peer is down are stale: raft resends what matters.
            if drain_or_closed(&mut rx) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        };
        if s.write_all(&hello).await.is_err() {
            continue;
        }
        if !was_up {
            tracing::info!(peer = format!("{peer:x}"), "peer connected");
        }
        was_up = true;
        backoff = BACKOFF_MIN;
        loop {
            out.clear();
            // An idle link still sends an empty frame now and then, so the peer knows it is
            // alive whatever raft has to say (etcd's links stay active the same way). The
            // peer writes nothing back, unless to say this member was removed.
            let mut back = [0u8; 1];
            tokio::select! {
                next = tokio::time::timeout(KEEPALIVE, rx.recv()) => match next {
                    Ok(Some(first)) => push_frame(&mut out, &first),
                    Ok(None) => return,
                    Err(_) => push_frame(&mut out, &[]),
                },
                got = s.read(&mut back) => {
                    if matches!(got, Ok(1)) && back[0] == GONE {
                        tracing::warn!(
                            peer = format!("{peer:x}"),
                            "a peer refused this member: it was removed from the cluster"
                        );
                        inbound.removed();
                        return;
                    }
                    // Closed by the peer (it refused the hello, or could not take the
                    // link): dial again only after the backoff, not in a tight loop.
                    tracing::info!(peer = format!("{peer:x}"), "lost the connection to a peer");
                    inbound.unreachable(peer);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue 'connect;
                }
            }
            while out.len() < 4 << 20 {
                match rx.try_recv() {
                    Ok(f) => push_frame(&mut out, &f),
                    Err(_) => break,
                }
            }
            if s.write_all(&out).await.is_err() {
                tracing::info!(peer = format!("{peer:x}"), "lost the connection to a peer");
                inbound.unreachable(peer);
                continue 'connect;
            }
            if out.capacity() > 8 << 20 {
                out = Vec::with_capacity(256 * 1024);
            }
        }
    }
}

/// Drops every queued frame; true if the queue's sender is gone.
fn drain_or_closed(rx: &mut mpsc::Receiver<Bytes>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(_) => {}
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

/// Appends `f` to `out` as a frame (`u32 length (LE) | payload`).
pub fn push_frame(out: &mut Vec<u8>, f: &[u8]) {
    out.extend_from_slice(&(f.len() as u32).to_le_bytes());
    out.extend_from_slice(f);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink {
        got: Mutex<Vec<(u64, Bytes)>>,
        lost: Mutex<Vec<u64>>,
        /// Peers this member holds as removed.
        removed_peers: Vec<u64>,
        /// Times a peer told this member it was removed.
        told_removed: std::sync::atomic::AtomicUsize,
    }

    impl Inbound for Sink {
        fn frame(&self, from: u64, frame: Bytes) {
            self.got.lock().unwrap().push((from, frame));
        }
        fn unreachable(&self, peer: u64) {
            self.lost.lock().unwrap().push(peer);
        }
        fn is_removed(&self, peer: u64) -> bool {
            self.removed_peers.contains(&peer)
        }
        fn removed(&self) {
            self.told_removed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn sink() -> Arc<Sink> {
        sink_removing(&[])
    }

    fn sink_removing(removed_peers: &[u64]) -> Arc<Sink> {
        Arc::new(Sink {
            got: Mutex::new(Vec::new()),
            lost: Mutex::new(Vec::new()),
            removed_peers: removed_peers.to_vec(),
            told_removed: Default::default(),
        })
    }

    /// A member removed from the cluster dials a member that knows it: refused, and told so
    /// (its frames never arrive); a member not removed is not told anything.
    #[tokio::test(flavor = "current_thread")]
    async fn a_removed_member_is_refused_and_told_so() {
        let rt = tokio::runtime::Handle::current();
        let (la, _) = listener();
        let (lb, ub) = listener();
        let (lc, _) = listener();
        let (sa, sb, sc) = (sink(), sink_removing(&[1]), sink());
        let a = Peers::start(rt.clone(), 1, 77, vec![la], sa.clone()).unwrap();
        let _b = Peers::start(rt.clone(), 2, 77, vec![lb], sb.clone()).unwrap();
        let c = Peers::start(rt.clone(), 3, 77, vec![lc], sc.clone()).unwrap();
        a.connect(2, vec![ub.clone()]);
        c.connect(2, vec![ub]);
        assert!(a.send(2, Bytes::from_static(b"from a removed member")));
        assert!(c.send(2, Bytes::from_static(b"from a member")));
        let told = || sa.told_removed.load(std::sync::atomic::Ordering::SeqCst);
        assert!(wait_for(|| told() == 1).await, "a was not told");
        assert!(wait_for(|| sb.got.lock().unwrap().len() == 1).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = sb.got.lock().unwrap().clone();
        assert_eq!(got, [(3, Bytes::from_static(b"from a member"))]);
        assert_eq!(sc.told_removed.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    fn listener() -> (std::net::TcpListener, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        (l, url)
    }

    async fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_arrive_in_order_and_other_clusters_are_refused() {
        let rt = tokio::runtime::Handle::current();
        let (la, _ua) = listener();
        let (lb, ub) = listener();
        let (sa, sb) = (sink(), sink());
        let a = Peers::start(rt.clone(), 1, 77, vec![la], sa.clone()).unwrap();
        let _b = Peers::start(rt.clone(), 2, 77, vec![lb], sb.clone()).unwrap();
        a.connect(2, vec![ub.clone()]);
        for i in 0..1000u32 {
            assert!(a.send(2, Bytes::from(i.to_le_bytes().to_vec())));
        }
        assert!(wait_for(|| sb.got.lock().unwrap().len() == 1000).await);
        let got = sb.got.lock().unwrap().clone();
        for (i, (from, f)) in got.iter().enumerate() {
            assert_eq!(*from, 1);
            assert_eq!(f.as_ref(), (i as u32).to_le_bytes());
        }
        assert!(!a.send(9, Bytes::from_static(b"x")), "no link to member 9");

        // A member of another cluster reaches b's port: b refuses it.
        let (lc, _uc) = listener();
        let sc = sink();
        let c = Peers::start(rt.clone(), 1, 78, vec![lc], sc).unwrap();
        c.connect(2, vec![ub.clone()]);
        assert!(c.send(2, Bytes::from_static(b"intruder")));
        // The right cluster but meant for member 3: refused too.
        let (ld, _ud) = listener();
        let d = Peers::start(rt.clone(), 1, 77, vec![ld], sink()).unwrap();
        d.connect(3, vec![ub]);
        assert!(d.send(3, Bytes::from_static(b"misdirected")));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sb.got.lock().unwrap().len(), 1000, "refused frames arrived");
    }

    /// A member that reads its links itself: they are parked here for the test to read.
    struct Adopter {
        sink: Arc<Sink>,
        links: Mutex<Vec<Adopted>>,
    }

    impl Inbound for Adopter {
        fn frame(&self, from: u64, frame: Bytes) {
            self.sink.frame(from, frame)
        }
        fn unreachable(&self, _: u64) {}
        fn adopts(&self) -> bool {
            true
        }
        fn adopt(&self, link: Adopted) {
            self.links.lock().unwrap().push(link);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_adopted_link_is_read_by_its_member_and_passes_the_rest_on() {
        let rt = tokio::runtime::Handle::current();
        let (la, _ua) = listener();
        let (lb, ub) = listener();
        let b_in = Arc::new(Adopter {
            sink: sink(),
            links: Mutex::new(Vec::new()),
        });
        let a = Peers::start(rt.clone(), 1, 77, vec![la], sink()).unwrap();
        let b = Peers::start(rt.clone(), 2, 77, vec![lb], b_in.clone()).unwrap();
        a.connect(2, vec![ub]);
        // Big frames too: they come in pieces across reads.
        let sent: Vec<Bytes> = (0..200u32)
            .map(|i| Bytes::from(vec![i as u8; 1 + (i as usize % 7) * 40_000]))
            .collect();
        for f in &sent {
            assert!(a.send(2, f.clone()));
        }
        assert!(wait_for(|| b_in.links.lock().unwrap().len() == 1).await);
        assert!(
            b.active_since(1).is_some(),
            "an adopted link counts as open"
        );
        let mut link = b_in.links.lock().unwrap().pop().unwrap();
        assert_eq!(link.from(), 1);
        let mut got = Vec::new();
        for _ in 0..500 {
            assert!(link.read(&mut |f| got.push(f)), "the link stays open");
            if got.len() == sent.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, sent, "every frame, whole and in order");
        // What the member hands back reaches Inbound::frame.
        link.pass(Bytes::from_static(b"lease"));
        assert!(wait_for(|| b_in.sink.got.lock().unwrap().len() == 1).await);
        // Dropped: the link is closed and no longer counted.
        drop(link);
        assert!(b.active_since(1).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_that_comes_back_is_reconnected() {
        let rt = tokio::runtime::Handle::current();
        let (la, _) = listener();
        let sa = sink();
        let a = Peers::start(rt.clone(), 1, 5, vec![la], sa.clone()).unwrap();
        // Reserve a port, free it, and point a at it while nobody listens.
        let (lb, ub) = listener();
        drop(lb);
        a.connect(2, vec![ub.clone()]);
        assert!(wait_for(|| sa.lost.lock().unwrap().contains(&2)).await);
        let lb = std::net::TcpListener::bind(url_authority(&ub)).unwrap();
        let sb = sink();
        let _b = Peers::start(rt.clone(), 2, 5, vec![lb], sb.clone()).unwrap();
        let ok = wait_for(|| {
            a.send(2, Bytes::from_static(b"hi"));
            !sb.got.lock().unwrap().is_empty()
        })
        .await;
        assert!(ok, "frames never arrived after the peer came up");
    }

    struct Taker {
        got: Mutex<Vec<Bytes>>,
    }

    impl Inbound for Taker {
        fn frame(&self, _: u64, _: Bytes) {}
        fn unreachable(&self, _: u64) {}
        fn receive_stream(&self, _: u64, next: &mut dyn FnMut() -> Option<Bytes>) -> bool {
            let mut got = Vec::new();
            while let Some(f) = next() {
                got.push(f);
            }
            // Takes a stream only if it ends with its own "end" frame.
            let whole = got.last().is_some_and(|f| f.as_ref() == b"end");
            *self.got.lock().unwrap() = got;
            whole
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_goes_on_its_own_connection_and_is_acknowledged() {
        let rt = tokio::runtime::Handle::current();
        let (la, _) = listener();
        let (lb, ub) = listener();
        let a = Peers::start(rt.clone(), 1, 5, vec![la], sink()).unwrap();
        let taker = Arc::new(Taker {
            got: Mutex::new(Vec::new()),
        });
        let _b = Peers::start(rt.clone(), 2, 5, vec![lb], taker.clone()).unwrap();
        a.connect(2, vec![ub]);
        for (frames, want) in [(vec!["a", "bb", "end"], true), (vec!["a", "cut"], false)] {
            let (tx, rx) = mpsc::channel(2);
            let (dtx, drx) = tokio::sync::oneshot::channel();
            a.send_stream(2, rx, Box::new(move |ok| dtx.send(ok).unwrap()));
            for f in &frames {
                tx.send(Bytes::from(f.as_bytes().to_vec())).await.unwrap();
            }
            drop(tx);
            assert_eq!(drx.await.unwrap(), want, "{frames:?}");
            let got: Vec<Bytes> = taker.got.lock().unwrap().clone();
            assert_eq!(got.len(), frames.len());
        }
    }

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let mut wire = Vec::new();
        push_frame(&mut wire, b"hello");
        push_frame(&mut wire, b"");
        push_frame(&mut wire, &[7u8; 3000]);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(f) = take_frame(&mut buf) {
                got.push(f.unwrap());
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref(), b"hello");
        assert!(got[1].is_empty());
        assert_eq!(got[2].len(), 3000);
        let mut big = BytesMut::new();
        big.extend_from_slice(&((FRAME_BYTES_MAX + 1) as u32).to_le_bytes());
        assert_eq!(take_frame(&mut big), Some(Err(FRAME_BYTES_MAX + 1)));
    }

    #[test]
    fn url_authorities() {
        assert_eq!(url_authority("http://127.0.0.1:2380"), "127.0.0.1:2380");
        assert_eq!(url_authority("https://h:1/x"), "h:1");
        assert_eq!(url_authority("10.0.0.1:2380"), "10.0.0.1:2380");
    }
}
