//! The raft core's own connections to its peers. It writes the messages that are not
//! appends (a follower's acks, heartbeats and their answers, votes, forwarded proposals,
//! read-index calls and answers) itself, straight from its turn, instead of waking the
//! transport's thread to do it: on a put at 1x1 that thread was one more wake-up each way.
//! Appends (and snapshots) still go through the transport, whose thread writes them while
//! the leader writes its own WAL (written here, a big one would hold that WAL write back:
//! on loopback a send also does the receiver's TCP work, and put 100x1000 lost a quarter of
//! its rate that way), and all of them on one connection, in order: appends split over two
//! connections overtake each other, and a follower that finds a gap rejects, which sends
//! the leader back to probing.
//!
//! Each is one more frames connection to the peer (the transport dials it, then hands it
//! over), written nonblocking. A turn's messages to one peer are queued in `pending` and
//! written with one send at the end of the turn (`flush`): a follower answers every append
//! of a batch, and on loopback each send also runs the receiver's TCP work. What the socket
//! does not take waits and goes when the poll says it is writable; anything sent meanwhile
//! queues behind it, up to `PENDING_MAX` (beyond, a message is dropped: raft resends). A
//! broken connection is dropped, the frames it had not written whole go through the
//! transport (a forwarded proposal or a vote is not resent by raft), and it is dialled again
//! after `REDIAL_AFTER`; until it is back, messages go through the transport. The messages
//! that go here do not depend on their order relative to appends.

use std::collections::HashMap;
use std::io::Write;

use bytes::Bytes;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use raft::eraftpb::MessageType;

const PENDING_MAX: usize = 4 << 20;
const REDIAL_AFTER: Duration = Duration::from_millis(100);

/// Frames this big or bigger go through the transport's thread (a batch of forwarded
/// proposals can be big).
pub const DIRECT_FRAME_MAX: usize = 16 * 1024;

/// Whether the raft core writes this message (of `frame_len` bytes as a frame) itself.
pub fn goes_direct(t: MessageType, frame_len: usize) -> bool {
    frame_len < DIRECT_FRAME_MAX && !matches!(t, MessageType::MsgAppend | MessageType::MsgSnapshot)
}

/// A dial whose answer never came (its message was lost to a full control queue) is given
/// up after this.
const DIAL_STUCK: Duration = Duration::from_secs(5);

struct Direct {
    stream: Option<TcpStream>,
    /// Its poll token while it has a stream.
    token: usize,
    pending: Vec<u8>,
    /// Bytes of `pending` already written (it starts with the frame being written).
    written: usize,
    /// Since when a dial is under way.
    dialing: Option<Instant>,
    retry_at: Instant,
}

#[derive(Default)]
pub struct Directs {
    by_peer: HashMap<u64, Direct>,
    by_token: HashMap<usize, u64>,
    /// Peers with frames queued this turn.
    queued: Vec<u64>,
}

/// What `Directs::send` did with a message.
pub enum Sent {
    /// Queued for this turn's `flush` (or behind what the socket has not taken yet), or
    /// dropped because too much is queued already (raft resends).
    Done,
    /// No connection yet (one is being dialled if `dial`): send it the other way.
    NotConnected { dial: bool },
}

impl Directs {
    /// Queues `frame` (a whole peer frame's payload) for `peer`; `flush` writes it.
    pub fn send(&mut self, peer: u64, frame: &[u8]) -> Sent {
        let d = self.by_peer.entry(peer).or_insert_with(|| Direct {
            stream: None,
            token: 0,
            pending: Vec::new(),
            written: 0,
            dialing: None,
            retry_at: Instant::now(),
        });
        if d.stream.is_none() {
            let now = Instant::now();
            let dial = d.dialing.is_none_or(|t| now >= t + DIAL_STUCK) && now >= d.retry_at;
            if dial {
                d.dialing = Some(now);
            }
            return Sent::NotConnected { dial };
        }
        if d.pending.len() + 4 + frame.len() > PENDING_MAX {
            return Sent::Done;
        }
        if d.pending.is_empty() {
            self.queued.push(peer);
        }
        keel_net::peer::push_frame(&mut d.pending, frame);
        Sent::Done
    }

    /// Writes what this turn queued: one send per peer (what the socket does not take waits
    /// for the poll). A connection that fails is dropped, and the frames it had not written
    /// whole are added to `lost` (with their peer), for the caller to send another way.
    pub fn flush(&mut self, registry: &mio::Registry, lost: &mut Vec<(u64, Vec<Bytes>)>) {
        let mut broken = Vec::new();
        for peer in self.queued.drain(..) {
            // A peer is queued only when it had nothing waiting for the poll.
            if let Some(d) = self.by_peer.get_mut(&peer) {
                if d.write_some().is_err() {
                    broken.push(d.token);
                }
            }
        }
        for token in broken {
            self.close(token, registry, lost);
        }
    }

    /// A connection dialled for `peer` (None: it could not be made), to be polled as
    /// `token`.
    pub fn connected(
        &mut self,
        peer: u64,
        stream: Option<TcpStream>,
        token: usize,
        registry: &mio::Registry,
    ) {
        let Some(d) = self.by_peer.get_mut(&peer) else {
            return;
        };
        d.dialing = None;
        if d.stream.is_some() {
            // A dial given up on (DIAL_STUCK) answered after all: the link in use stays.
            return;
        }
        let Some(stream) = stream else {
            d.retry_at = Instant::now() + REDIAL_AFTER;
            return;
        };
        let fd = stream.as_raw_fd();
        // Writable only: nothing comes back on it. Edge-triggered, so an event comes only
        // once a full socket has room again.
        if registry
            .register(
                &mut mio::unix::SourceFd(&fd),
                mio::Token(token),
                mio::Interest::WRITABLE,
            )
            .is_err()
        {
            d.retry_at = Instant::now() + REDIAL_AFTER;
            return;
        }
        d.stream = Some(stream);
        d.token = token;
        d.pending.clear();
        d.written = 0;
        self.by_token.insert(token, peer);
    }

    /// The poll reported `token` ready: writes what waits (frames of a connection that fails
    /// go to `lost`, as in `flush`). False if it is not one of these.
    pub fn ready(
        &mut self,
        token: usize,
        registry: &mio::Registry,
        lost: &mut Vec<(u64, Vec<Bytes>)>,
    ) -> bool {
        let Some(peer) = self.by_token.get(&token) else {
            return false;
        };
        let d = self.by_peer.get_mut(peer).expect("a token's peer");
        if d.write_some().is_err() {
            self.close(token, registry, lost);
        }
        true
    }

    /// Drops the connections to peers that are no longer members.
    pub fn retain(&mut self, mut member: impl FnMut(u64) -> bool, registry: &mio::Registry) {
        let gone: Vec<usize> = (self.by_peer.iter())
            .filter(|(p, _)| !member(**p))
            .map(|(_, d)| d.token)
            .collect();
        for token in gone {
            self.close(token, registry, &mut Vec::new());
        }
        self.by_peer.retain(|p, _| member(*p));
    }

    fn close(&mut self, token: usize, registry: &mio::Registry, lost: &mut Vec<(u64, Vec<Bytes>)>) {
        let Some(peer) = self.by_token.remove(&token) else {
            return;
        };
        if let Some(d) = self.by_peer.get_mut(&peer) {
            if let Some(s) = d.stream.take() {
                let fd = s.as_raw_fd();
                let _ = registry.deregister(&mut mio::unix::SourceFd(&fd));
            }
            // Every frame not written whole (the peer drops a partial one with the link).
            let frames = whole_frames(&std::mem::take(&mut d.pending));
            if !frames.is_empty() {
                lost.push((peer, frames));
            }
            d.written = 0;
            d.retry_at = Instant::now() + REDIAL_AFTER;
        }
    }
}

impl Direct {
    /// Writes as much of `pending` (past its `written` bytes) as the nonblocking socket
    /// takes now, then drops the frames written whole; `pending` still starts at a frame.
    /// What stays waits for the poll (edge-triggered: it reports room once the socket takes
    /// more).
    fn write_some(&mut self) -> std::io::Result<()> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(());
        };
        let res = loop {
            if self.written == self.pending.len() {
                break Ok(());
            }
            match s.write(&self.pending[self.written..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let mut whole = 0;
        while let Some(len) = frame_len(&self.pending[whole..]) {
            if whole + len > self.written {
                break;
            }
            whole += len;
        }
        self.pending.drain(..whole);
        self.written -= whole;
        res
    }
}

/// The length (header included) of the frame `b` starts with, if its header is there.
fn frame_len(b: &[u8]) -> Option<usize> {
    let head: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(4 + u32::from_le_bytes(head) as usize)
}

/// The payloads of the whole frames `b` holds, in order.
fn whole_frames(mut b: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(len) = frame_len(b).filter(|l| *l <= b.len()) {
        out.push(Bytes::copy_from_slice(&b[4..len]));
        b = &b[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Frames the socket cannot take at once wait and go, in order, as the poll reports
    /// room; a peer without a connection asks for one dial only.
    #[test]
    fn what_the_socket_cannot_take_goes_later_in_order() {
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(16);
        let mut d = Directs::default();
        assert!(matches!(d.send(7, b"x"), Sent::NotConnected { dial: true }));
        assert!(matches!(
            d.send(7, b"x"),
            Sent::NotConnected { dial: false }
        ));

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        out.set_nonblocking(true).unwrap();
        let (mut inp, _) = l.accept().unwrap();
        d.connected(7, Some(out), 3, poll.registry());
        // Far more than the socket buffers hold while nobody reads.
        let frames: Vec<Vec<u8>> = (0..400u32).map(|i| vec![i as u8; 10_000]).collect();
        for f in &frames {
            assert!(matches!(d.send(7, f), Sent::Done));
        }
        let queued = frames.len() * (4 + 10_000);
        assert_eq!(
            (d.by_peer[&7].pending.len(), d.by_peer[&7].written),
            (queued, 0),
            "nothing is written before the turn's flush"
        );
        d.flush(poll.registry(), &mut Vec::new());
        assert!(d.by_peer[&7].pending.len() < queued, "the flush wrote");
        assert!(!d.by_peer[&7].pending.is_empty(), "the socket filled up");

        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            inp.read_to_end(&mut all).unwrap();
            all
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.by_peer[&7].pending.is_empty() {
            assert!(Instant::now() < deadline, "pending never drained");
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            for ev in events.iter() {
                assert!(d.ready(ev.token().0, poll.registry(), &mut Vec::new()));
            }
        }
        // Leaving the member set closes the connection.
        d.retain(|_| false, poll.registry());
        let all = reader.join().unwrap();
        let mut want = Vec::new();
        for f in &frames {
            keel_net::peer::push_frame(&mut want, f);
        }
        assert_eq!(all.len(), want.len());
        assert!(all == want, "frames whole and in order");
        assert!(
            !d.ready(3, poll.registry(), &mut Vec::new()),
            "its token is gone"
        );
    }

    /// A connection that breaks gives back, whole and in order, every frame it had not
    /// written whole, for the transport to carry; then the peer has no direct link.
    #[test]
    fn frames_of_a_broken_connection_come_back_whole() {
        let poll = mio::Poll::new().unwrap();
        let mut d = Directs::default();
        assert!(matches!(d.send(9, b"x"), Sent::NotConnected { dial: true }));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        out.set_nonblocking(true).unwrap();
        let (inp, _) = l.accept().unwrap();
        d.connected(9, Some(out), 5, poll.registry());
        drop(inp);
        let (mut lost, mut sent) = (Vec::new(), Vec::new());
        for i in 0..100u8 {
            let f = vec![i; 1000 + i as usize];
            assert!(matches!(d.send(9, &f), Sent::Done));
            sent.push(f);
            if i % 3 == 2 {
                d.flush(poll.registry(), &mut lost);
                if !lost.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert_eq!(lost.len(), 1, "the write to a closed peer fails");
        let (peer, frames) = &lost[0];
        assert_eq!(*peer, 9);
        assert!(!frames.is_empty() && frames.len() <= 3, "{}", frames.len());
        for (back, f) in frames.iter().zip(&sent[sent.len() - frames.len()..]) {
            assert_eq!(&back[..], &f[..]);
        }
        assert!(matches!(d.send(9, b"y"), Sent::NotConnected { .. }));
    }

    #[test]
    fn a_partial_frame_is_not_given_back() {
        let mut b = Vec::new();
        keel_net::peer::push_frame(&mut b, b"one");
        keel_net::peer::push_frame(&mut b, b"two!");
        keel_net::peer::push_frame(&mut b, b"three");
        let frames = whole_frames(&b[..b.len() - 2]);
        assert_eq!(frames, vec![Bytes::from("one"), Bytes::from("two!")]);
    }
}
