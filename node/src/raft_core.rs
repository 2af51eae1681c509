//! The raft core: one pinned thread that owns raft-rs's `RawNode`, the WAL (through
//! `RaftLog`) and apply. Net cores hand it proposals over a bounded channel; it answers each
//! through its own oneshot once the entry is durable, committed and applied.
//!
//! One turn of the loop (raft-rs's documented `Ready` order):
//! 1. wait for a proposal or the next tick, then drain *every* waiting proposal (group commit:
//!    they share one raft batch, one WAL write and one fdatasync);
//! 2. `ready()`: send messages to peers (a leader's appends go out before its own WAL write,
//!    so followers write in parallel), apply committed entries, persist entries + HardState in
//!    one WAL record, send persisted messages (a follower's acks: only once durable),
//!    `advance`, then the LightReady's commit, messages and committed entries, `advance_apply`.
//!
//! Besides proposals, a control channel brings raft messages from peers, linearizable reads
//! (all reads waiting at one moment share one ReadIndex round) and lost peers.
//!
//! When the leader changes, nothing waits blindly: reads still waiting for a read index get
//! etcd's "leader changed"; a proposal made under an older term is answered as soon as it
//! applies, or, once the new leader's first entry has applied and a short grace has passed
//! without it, with "leader changed" (it was lost with the old leader).
//!
//! Proposals carry no ID inside the request: the raft core stamps each entry's `context` with
//! a cluster-unique ID (member ID prefix + counter) so a member recognises its own entries at
//! apply, also after forwarding in a multi-node cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use crossbeam_channel::Receiver;
use keel_net::peer::{Adopted, Peers};
use keel_net::{ApiError, WriteResponse};
use keel_proto::keelpb::InternalRequest;
use keel_proto::prost::Message;
use keel_storage::raftlog::RaftLog;
use keel_storage::store::Store;
use raft::eraftpb::{Entry, EntryType, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::oneshot;

use crate::apply;
use crate::bell::{Bell, Tx};
use crate::cluster::Membership;
use crate::direct::{goes_direct, Directs, Sent};
use crate::lease::LeaseBook;

pub type Responder = oneshot::Sender<Result<WriteResponse, ApiError>>;

/// What wakes the raft core.
enum Input {
    Propose(Proposal),
    Control(Control),
}

/// A write on its way to raft: the encoded `InternalRequest` and who waits for the result.
pub struct Proposal {
    pub data: Vec<u8>,
    pub tx: Responder,
}

/// A linearizable read waiting for its go-ahead.
pub type Reader = oneshot::Sender<Result<(), ApiError>>;

/// How the raft core reaches the rest of the cluster.
pub struct Links {
    /// Its control channel (both ends: it keeps a sender so the channel never disconnects).
    pub control: (Tx<Control>, Receiver<Control>),
    /// The peer transport (none for a lone member).
    pub peers: Option<Arc<Peers>>,
    pub membership: Arc<Membership>,
    /// Starts the peer transport when a lone member gets company.
    pub start_peers: Option<PeerStarter>,
    /// What the raft core parks on while it reads peer links itself, and the bell its
    /// senders ring.
    pub poll: (mio::Poll, Arc<Bell>),
}

pub type PeerStarter = Box<dyn FnOnce() -> anyhow::Result<Arc<Peers>> + Send>;

/// What else reaches the raft core (over its control channel).
pub enum Control {
    /// A raft message from a peer.
    Step(Box<raft::eraftpb::Message>),
    /// A linearizable read: answered once this member has applied everything committed when
    /// the read arrived (ReadIndex), or with why not.
    ReadIndex(Reader),
    /// The transport lost a peer: raft probes it instead of streaming appends into the void.
    Unreachable(u64),
    /// A whole state from the leader, written to a backend file of its own (the path): its
    /// raft message.
    Snapshot(Box<(raft::eraftpb::Message, std::path::PathBuf)>),
    /// A state sent to a member: whether it took it.
    SnapshotSent(u64, bool),
    /// A membership change to propose (MemberAdd, MemberRemove).
    ProposeConf(Box<raft::eraftpb::ConfChange>, Responder),
    /// MemberPromote: the leader checks the learner has caught up, then proposes it.
    Promote(u64, Responder),
    /// MoveLeader: the leader hands leadership to this voter.
    MoveLeader(u64, Responder),
    /// The member is stopping (SIGTERM): a leader hands leadership to its most caught-up
    /// voter first, as etcd's stop does; anything else has nothing to hand over.
    StepDown(Responder),
    /// A frames connection from a peer, to read here (see `Adopted`).
    Adopt(Box<Adopted>),
    /// A connection of the raft core's own to this peer (see `direct`), or None if it could
    /// not be made.
    Direct(u64, Option<std::net::TcpStream>),
}

/// How long a leadership transfer may take (etcd: its request timeout, 5 s + 2 elections).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(7);

/// Control messages waiting at most (raft messages beyond are dropped; raft resends). The
/// queue's slots are allocated whole when it is made, so a control message is kept small:
/// anything bigger than two words goes in a box.
pub const CONTROL_QUEUE_MAX: usize = 16 * 1024;
const _: () = assert!(std::mem::size_of::<Control>() <= 24);
/// A ReadIndex round that got no answer is asked again after this (a new leader drops reads
/// until it has committed an entry of its term).
const READ_INDEX_RETRY: Duration = Duration::from_millis(200);
/// After a leader change, how long an older term's proposal may still show up in the new
/// leader's log (forwarded late) before it is given up as lost.
const ORPHAN_GRACE: Duration = Duration::from_millis(300);

/// Writes held while there is no leader at most (beyond: "no leader" at once).
const LEADERLESS_MAX: usize = 16 * 1024;
/// Most proposals drained into one batch (bounds one WAL record and one turn's latency).
const BATCH_PROPOSALS_MAX: usize = 8192;
const BATCH_BYTES_MAX: usize = 32 << 20;
/// Most proposal data stepped into raft as one message (a follower forwards it to the leader
/// as one peer frame, which may be at most `keel_net::peer::FRAME_BYTES_MAX`).
const PROPOSE_MESSAGE_BYTES: usize = 8 << 20;
/// What a batch's WAL record adds to its entries' data: 49 B per entry (index, term, type,
/// two lengths, the 8 B proposal ID), the hard state and the record header and padding.
const BATCH_OVERHEAD_BYTES_MAX: usize = 1 << 20;
const _: () = assert!(BATCH_PROPOSALS_MAX * 49 + 64 * 1024 <= BATCH_OVERHEAD_BYTES_MAX);
/// The largest request the raft core can always write. A batch stops taking proposals once it
/// holds more than `BATCH_BYTES_MAX`, so it is at most that plus one request, plus overhead,
/// and it must fit one WAL record. `--max-request-bytes` above this is refused at start-up.
pub const REQUEST_BYTES_LIMIT: usize =
    keel_storage::wal::RECORD_BYTES_MAX - BATCH_BYTES_MAX - BATCH_OVERHEAD_BYTES_MAX;
/// How long the loop polls for more work before parking while busy: a parked thread costs a
/// futex wake (tens of µs) on the single-client path. Measured here (put 1x1, medians of 3):
/// 300 µs gives 3584 req/s and p99.9 0.85 ms, 50 µs 2864 req/s and p99.9 8-13 ms; 100x1000
/// the same within noise.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(300);
/// How long a WAL write's completion is polled for before the loop sleeps on it, while it
/// spins (see `spinning`).
const WAL_SPIN: Duration = Duration::from_micros(200);
/// Answers the raft core has sent so far (a net core about to sleep while one of its
/// callers waits polls it briefly: see `spin_for_answer`).
pub static ANSWERED: AtomicU64 = AtomicU64::new(0);
/// How long a net core polls for an answer before it sleeps.
const NET_SPIN: Duration = Duration::from_micros(150);
/// A net core polls only while at most this many of its callers wait.
const NET_SPIN_CALLERS_MAX: usize = 4;

thread_local! {
    /// Callers on this thread waiting for the raft core's answer.
    static WAITING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a caller waiting for the raft core's answer on this thread while it lives.
pub struct Waiting(());

impl Waiting {
    pub fn start() -> Waiting {
        WAITING.with(|w| w.set(w.get() + 1));
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.with(|w| w.set(w.get().saturating_sub(1)));
    }
}

/// Called by a lone member's net core just before it sleeps: while a few of its callers wait
/// for the raft core's answer, it polls for a new answer for up to `NET_SPIN`, so the answer
/// finds it awake (its runtime's wake-up then costs no sleep). A member of a cluster never
/// polls (the members may share the machine; the answer is a network round away).
pub fn spin_for_answer(multi: &std::sync::atomic::AtomicBool) {
    if !polls_for_answer(WAITING.with(|w| w.get()), multi.load(Ordering::Relaxed)) {
        return;
    }
    let seen = ANSWERED.load(Ordering::Acquire);
    let until = Instant::now() + NET_SPIN;
    while ANSWERED.load(Ordering::Acquire) == seen && Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Whether a net core with `waiting` callers polls before it sleeps. Many callers waiting:
/// more requests are on their way anyway, and the poll would take the CPU from the raft core
/// and from them.
fn polls_for_answer(waiting: usize, multi: bool) -> bool {
    (1..=NET_SPIN_CALLERS_MAX).contains(&waiting) && !multi
}

/// "Busy": a proposal arrived this recently. An idle node parks at once.
const BUSY_WINDOW: Duration = Duration::from_millis(2);
/// The spin pays only while proposals come back soon after a turn (a client waiting for its
/// answer to send the next): once the last one came later than this after the loop began to
/// wait, the loop parks at once (at 200 puts/s the spin was 300 µs of CPU per put, taken
/// from the net core and the clients on a small machine).
const SPIN_PAYS_WITHIN: Duration = Duration::from_micros(600);

/// What the raft core publishes for everyone else to read without asking it.
#[derive(Default)]
pub struct RaftStatus {
    pub term: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    pub leader_id: AtomicU64,
    /// Active alarms (member, type), as applied.
    pub alarms: std::sync::Mutex<Vec<(u64, i32)>>,
    /// The cluster has more than one member (reads need ReadIndex, leases go to the leader).
    pub multi: std::sync::atomic::AtomicBool,
    /// This member is a learner (it serves only serializable reads and status).
    pub learner: std::sync::atomic::AtomicBool,
}

pub struct RaftCore {
    node: RawNode<RaftLog>,
    store: Store,
    leases: LeaseBook,
    last_expiry_scan: Instant,
    status: Arc<RaftStatus>,
    rx: Receiver<Proposal>,
    ctl: Receiver<Control>,
    /// Keeps `ctl` connected whoever else holds a sender.
    _ctl_tx: Tx<Control>,
    /// Peer links read here (`Adopted`), by their poll token.
    links: HashMap<usize, Adopted>,
    next_link: usize,
    poll: mio::Poll,
    events: mio::Events,
    bell: Arc<Bell>,
    /// Links that had something to read at the last poll.
    readable: Vec<usize>,
    /// Its own connections to peers, for what it sends after its turn's work.
    directs: Directs,
    peers: Option<Arc<Peers>>,
    start_peers: Option<PeerStarter>,
    membership: Arc<Membership>,
    /// Waiting proposals: the term they were made in and who waits.
    pending: HashMap<u64, (u64, Responder)>,
    /// Client writes that came while this member knew no leader (raft-rs would drop them),
    /// with when: proposed once one is known, so a write sent during an election commits after
    /// it, as etcd's do. etcd holds them up to its 7 s request timeout; these wait at most an
    /// election timeout, then "no leader" (answered within 2 s, the cluster's failover rule).
    leaderless: std::collections::VecDeque<(Instant, Proposal)>,
    /// This turn's proposals, stepped into raft as one message (`flush_proposals`).
    batch: Vec<Proposal>,
    /// Reads collected this turn, asked together in one ReadIndex round.
    read_batch: Vec<Reader>,
    /// ReadIndex rounds asked: context -> (when, readers).
    reads_asked: HashMap<u64, (Instant, Vec<Reader>)>,
    /// Reads with a read index, waiting for apply to reach it.
    reads_ready: BTreeMap<u64, Vec<Reader>>,
    next_read: u64,
    /// (term, leader) last published; a change answers what waited on the old leader.
    seen: (u64, u64),
    was_leader: bool,
    /// Set at a leader change: look for lost proposals once the new term's first entry has
    /// applied and this instant has passed.
    orphan_sweep: Option<Instant>,
    election_timeout: Duration,
    /// The backend file (a state from the leader replaces it).
    db_path: std::path::PathBuf,
    /// MoveLeader calls waiting: (target, deadline, who waits).
    transfers: Vec<(u64, Instant, Responder)>,
    /// The last state received from a leader: its (index, term) and file.
    incoming: Option<((u64, u64), std::path::PathBuf)>,
    /// `--auto-promote-learners`.
    auto_promote: bool,
    /// `--strict-reconfig-check`.
    strict_reconfig: bool,
    next_id: u64,
    tick: Duration,
    last_proposal: Instant,
    /// The last proposal came within `SPIN_PAYS_WITHIN` of the loop starting to wait.
    spin_pays: bool,
    /// The heap was handed back since the last proposal (see `IDLE_COLLECT_AFTER`).
    collected: bool,
    /// Entries between two snapshots (`--snapshot-count`).
    snapshot_count: u64,
    /// Entries kept in the WAL after a snapshot for followers catching up.
    catchup_entries: u64,
    /// The index of the last snapshot (the WAL before it, less a margin, is released).
    last_snapshot: u64,
    /// The store's alarms epoch last published to `status`.
    alarms_epoch: u64,
}

impl RaftCore {
    pub fn new(
        log: RaftLog,
        store: Store,
        leases: LeaseBook,
        status: Arc<RaftStatus>,
        rx: Receiver<Proposal>,
        links: Links,
        cfg: &crate::config::Config,
    ) -> anyhow::Result<RaftCore> {
        let (heartbeat_ms, election_ms) = (cfg.heartbeat_ms, cfg.election_ms);
        let (snapshot_count, catchup_entries) = (cfg.snapshot_count, cfg.snapshot_catchup_entries);
        let meta = log.meta().clone();
        let raft_cfg = raft::Config {
            id: meta.member_id,
            election_tick: (election_ms / heartbeat_ms) as usize,
            heartbeat_tick: 1,
            // The backend holds every entry up to its consistent index: raft re-delivers only
            // the committed entries after it (the log, opened at that snapshot point, counts
            // them committed).
            applied: store.applied().0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_cfg.validate()?;
        status
            .applied_index
            .store(raft_cfg.applied, Ordering::Release);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut log = log;
        log.set_keep_applied(catchup_entries.max(1));
        let conf = raft::Storage::initial_state(&log)?.conf_state;
        let mut node = RawNode::new(&raft_cfg, log, &logger)?;
        if conf.voters == [meta.member_id] && conf.learners.is_empty() {
            // A lone voter need not wait an election timeout to lead.
            node.campaign()?;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(RaftCore {
            node,
            store,
            leases,
            last_expiry_scan: Instant::now(),
            status,
            rx,
            ctl: links.control.1,
            _ctl_tx: links.control.0,
            links: HashMap::new(),
            next_link: 1,
            poll: links.poll.0,
            events: mio::Events::with_capacity(64),
            bell: links.poll.1,
            readable: Vec::new(),
            directs: Directs::default(),
            peers: links.peers,
            start_peers: links.start_peers,
            membership: links.membership,
            pending: HashMap::new(),
            leaderless: Default::default(),
            batch: Vec::new(),
            read_batch: Vec::new(),
            reads_asked: HashMap::new(),
            reads_ready: BTreeMap::new(),
            // Unique across members and restarts, as proposal IDs: a late answer to another
            // member's round, or to this member's before a restart, must never match.
            next_read: ((meta.member_id & 0xffff) << 48) | ((now_ms << 8) & ((1 << 48) - 1)),
            seen: (0, 0),
            was_leader: false,
            orphan_sweep: None,
            election_timeout: Duration::from_millis(election_ms),
            db_path: cfg.db_path(),
            transfers: Vec::new(),
            incoming: None,
            auto_promote: cfg.auto_promote_learners,
            strict_reconfig: cfg.strict_reconfig_check,
            next_id: ((meta.member_id & 0xffff) << 48) | ((now_ms << 8) & ((1 << 48) - 1)),
            tick: Duration::from_millis(heartbeat_ms),
            last_proposal: Instant::now(),
            spin_pays: true,
            collected: false,
            snapshot_count: snapshot_count.max(1),
            catchup_entries,
            last_snapshot: raft_cfg.applied,
            alarms_epoch: u64::MAX,
        })
    }

    /// Runs the ready loop until every proposal sender is gone.
    pub fn run(mut self) {
        const IDLE_COLLECT_AFTER: Duration = Duration::from_millis(100);
        let mut next_tick = Instant::now() + self.tick;
        loop {
            // A leader learnt of in the last turn takes the writes held for one now, so this
            // turn's ready carries them.
            self.propose_leaderless();
            self.on_ready();
            self.commit_backend_if_due();
            let mut batch_bytes = 0;
            let waiting_since = Instant::now();
            match self.wait(next_tick) {
                Ok(Some(Input::Propose(p))) => {
                    self.spin_pays = waiting_since.elapsed() <= SPIN_PAYS_WITHIN;
                    batch_bytes += p.data.len();
                    self.propose(p);
                }
                Ok(Some(Input::Control(c))) => self.control(c),
                Ok(None) => {}
                Err(()) => return,
            }
            while let Ok(c) = self.ctl.try_recv() {
                self.control(c);
            }
            self.read_links();
            for _ in 1..BATCH_PROPOSALS_MAX {
                if batch_bytes > BATCH_BYTES_MAX {
                    break;
                }
                match self.rx.try_recv() {
                    Ok(p) => {
                        batch_bytes += p.data.len();
                        self.propose(p);
                    }
                    Err(_) => break,
                }
            }
            self.flush_proposals();
            self.ask_read_index();
            if Instant::now() >= next_tick {
                if !self.collected && self.last_proposal.elapsed() >= IDLE_COLLECT_AFTER {
                    // mimalloc purges what this thread freed only when it allocates again, so
                    // a burst's garbage would sit in RSS for as long as the node idles.
                    crate::return_freed_memory();
                    self.collected = true;
                }
                self.node.tick();
                if self.last_expiry_scan.elapsed() >= crate::lease::EXPIRY_SCAN {
                    self.last_expiry_scan = Instant::now();
                    self.revoke_expired();
                    self.checkpoint_leases();
                }
                self.retry_reads();
                self.sweep_orphans();
                // Callers that gave up (their proposal was lost on the way, e.g. a forward
                // dropped by a full queue) leave nothing behind.
                self.pending.retain(|_, (_, tx)| !tx.is_closed());
                let given_up = Instant::now().checked_sub(self.election_timeout);
                while let Some((at, _)) = self.leaderless.front() {
                    if given_up.is_none_or(|g| *at > g) {
                        break;
                    }
                    let (_, p) = self.leaderless.pop_front().expect("front");
                    let _ = p.tx.send(Err(ApiError::NoLeader));
                }
                self.leaderless.retain(|(_, p)| !p.tx.is_closed());
                self.check_transfers();
                self.auto_promote();
                if let Some(peers) = &self.peers {
                    self.directs
                        .retain(|p| peers.has_link(p), self.poll.registry());
                }
                next_tick += self.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.tick;
                }
            }
        }
    }

    /// Waits for a proposal or a control message until `deadline`; spins briefly first. Err
    /// when the proposal senders are gone.
    fn wait(&mut self, deadline: Instant) -> Result<Option<Input>, ()> {
        if !self.links.is_empty() {
            return self.wait_polling(deadline);
        }
        let now = Instant::now();
        let spin = if self.spinning() {
            SPIN_BEFORE_PARK
        } else {
            Duration::ZERO
        };
        let spin_until = now + spin;
        while Instant::now() < spin_until.min(deadline) {
            if let Some(input) = self.try_input()? {
                return Ok(Some(input));
            }
            std::hint::spin_loop();
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(self.rx) -> p => match p {
                Ok(p) => Ok(Some(Input::Propose(p))),
                Err(_) => Err(()),
            },
            recv(self.ctl) -> c => Ok(c.ok().map(Input::Control)),
            default(timeout) => Ok(None),
        }
    }

    /// Whether the loop polls instead of sleeping (for the next proposal, for its WAL write).
    /// Alone, the next proposal is the only thing worth catching early. With peers, the turn
    /// waits on their acks (a network hop anyway), and a spinning leader would take the CPU
    /// from members that share the machine.
    fn spinning(&self) -> bool {
        let alone = self.peers.is_none();
        let busy = self.last_proposal.elapsed() < BUSY_WINDOW;
        alone && busy && self.spin_pays
    }

    /// `wait` while this member reads peer links itself: parks in the poll (peer sockets and
    /// the bell), never spins (the members of a cluster may share the machine).
    fn wait_polling(&mut self, deadline: Instant) -> Result<Option<Input>, ()> {
        // The sockets are looked at every turn, whatever waits in the channels: a leader
        // taking proposals nonstop must still hear its followers' acks.
        self.harvest(Some(Duration::ZERO));
        loop {
            if let Some(input) = self.try_input()? {
                return Ok(Some(input));
            }
            if !self.readable.is_empty() {
                return Ok(None);
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                return Ok(None);
            }
            self.bell.park();
            // Sent before the bell was raised: the ring may have been skipped.
            if self.rx.is_empty() && self.ctl.is_empty() {
                self.harvest(Some(timeout));
            }
            self.bell.unpark();
        }
    }

    /// Polls (waiting at most `timeout`) and notes which peer sockets are ready.
    fn harvest(&mut self, timeout: Option<Duration>) {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => crate::fatal(crate::FATAL_EXIT_CODE, &format!("poll: {e}")),
        }
        for ev in self.events.iter() {
            if ev.token() != crate::bell::BELL {
                self.readable.push(ev.token().0);
            }
        }
        self.events.clear();
    }

    fn try_input(&self) -> Result<Option<Input>, ()> {
        if let Ok(c) = self.ctl.try_recv() {
            return Ok(Some(Input::Control(c)));
        }
        match self.rx.try_recv() {
            Ok(p) => Ok(Some(Input::Propose(p))),
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(()),
        }
    }

    /// Reads the peer links that had something to read: raft messages are stepped here,
    /// anything else goes to the transport's runtime. A link that closed is dropped.
    fn read_links(&mut self) {
        if self.readable.is_empty() {
            return;
        }
        let mut frames = Vec::new();
        let mut readable = std::mem::take(&mut self.readable);
        readable.sort_unstable();
        readable.dedup();
        for token in readable.drain(..) {
            let mut lost = Vec::new();
            if self.directs.ready(token, self.poll.registry(), &mut lost) {
                self.resend(lost);
                continue;
            }
            let Some(link) = self.links.get_mut(&token) else {
                continue;
            };
            let open = link.read(&mut |f| frames.push(f));
            for f in frames.drain(..) {
                if f.first() != Some(&crate::cluster::FRAME_RAFT) {
                    link.pass(f);
                    continue;
                }
                if let Some(m) = crate::cluster::parse_raft_frame(link.from(), &f) {
                    Self::step_peer(&mut self.node, m);
                }
            }
            if !open {
                let from = link.from();
                self.drop_link(token);
                self.leader_lost(from);
            }
        }
        self.readable = readable;
    }

    /// Steps a raft message from a peer.
    fn step_peer(node: &mut RawNode<RaftLog>, m: raft::eraftpb::Message) {
        // A snapshot comes only as a stream, with its state (`Control::Snapshot`).
        if m.get_msg_type() == MessageType::MsgSnapshot {
            return;
        }
        // Messages from unknown or removed members, or stale ones, are refused by raft;
        // nothing to do about them here.
        let _ = node.step(m);
    }

    /// A poll token for a new socket.
    fn next_token(&mut self) -> usize {
        self.next_link += 1;
        self.next_link - 1
    }

    /// The connection from (or to) `peer` closed or could not be made. If it is the leader a
    /// follower hears from, this member's next election comes soon after the shortest
    /// timeout raft allows (`election_tick`) instead of at a random one up to twice that: a
    /// leader whose process died closes its connections at once, and the survivors take
    /// over sooner (failover ~1.1-1.3 s after the last heartbeat, was 1.0-2.0 s and more).
    /// Any timeout in that range is one raft could have drawn, so nothing else changes: a
    /// leader still alive keeps resetting the timer with its heartbeats, pre-vote still asks
    /// the others, and they still ignore it while they hear from a leader (check-quorum).
    ///
    /// The timeout is `election_tick + 1 + (members with a lower ID)`:
    /// - one tick more than the shortest, so the others' lease on the old leader (an
    ///   election timeout of their own ticks, which run at another phase) has run out when
    ///   the first stands; standing inside it, it was ignored, drew a new random timeout and,
    ///   if the other's log was longer than its own, the other was refused too: a whole
    ///   random timeout more (seen, 2.1 s);
    /// - a tick per lower ID, so no two survivors stand in the same tick and split the vote,
    ///   and one refused for a shorter log leaves the next one to win a tick later.
    fn leader_lost(&mut self, peer: u64) {
        let raft = &mut self.node.raft;
        if raft.state != StateRole::Follower || raft.leader_id != peer || peer == 0 {
            return;
        }
        let rank = raft.prs().iter().filter(|(&v, _)| v < raft.id).count();
        let timeout = raft.election_timeout();
        let soon = (timeout + 1 + rank).min(2 * timeout - 1);
        if raft.randomized_election_timeout() > soon {
            raft.set_randomized_election_timeout(soon);
        }
    }

    fn adopt(&mut self, link: Adopted) {
        use std::os::fd::AsRawFd;
        let token = self.next_token();
        let fd = link.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(token),
            mio::Interest::READABLE,
        ) {
            tracing::warn!(error = %e, "cannot wait on a peer link");
            return;
        }
        self.links.insert(token, link);
        // Whatever came before it was registered.
        self.readable.push(token);
    }

    fn drop_link(&mut self, token: usize) {
        use std::os::fd::AsRawFd;
        if let Some(link) = self.links.remove(&token) {
            let fd = link.as_raw_fd();
            let _ = self
                .poll
                .registry()
                .deregister(&mut mio::unix::SourceFd(&fd));
        }
        if self.links.is_empty() {
            // Without links the loop waits on its channels only, and nobody would see the
            // own connections' room come back: they are closed (dialled again when needed).
            self.directs.retain(|_| false, self.poll.registry());
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Adopt(link) => self.adopt(*link),
            Control::Direct(peer, stream) => {
                let token = self.next_token();
                self.directs
                    .connected(peer, stream, token, self.poll.registry());
            }
            Control::Step(m) => Self::step_peer(&mut self.node, *m),
            Control::ReadIndex(tx) => self.read_batch.push(tx),
            Control::Unreachable(peer) => {
                self.node.report_unreachable(peer);
                self.leader_lost(peer);
            }
            Control::Snapshot(b) => {
                let (m, path) = *b;
                let meta = m.get_snapshot().get_metadata();
                let point = (meta.index, meta.term);
                tracing::info!(
                    from = format!("{:x}", m.from),
                    index = point.0,
                    "received the leader's state"
                );
                if let Some((_, old)) = self.incoming.replace((point, path)) {
                    if old != self.incoming.as_ref().expect("just set").1 {
                        let _ = std::fs::remove_file(old);
                    }
                }
                let _ = self.node.step(m);
            }
            Control::ProposeConf(cc, tx) => self.propose_conf(*cc, tx),
            Control::Promote(id, tx) => self.promote(id, tx),
            Control::MoveLeader(target, tx) => self.move_leader(target, tx),
            Control::StepDown(tx) => self.step_down(tx),
            Control::SnapshotSent(to, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
        }
    }

    /// Asks one ReadIndex round for every read collected since the last one. One round is in
    /// flight at a time (as etcd's linearizable read loop): reads that come while it is out
    /// wait for the next, which then serves them all. A round per read would cost a heartbeat
    /// to every follower and their answers each; under load, one per round trip does.
    fn ask_read_index(&mut self) {
        if self.read_batch.is_empty() || self.read_round_in_flight() {
            return;
        }
        let readers = std::mem::take(&mut self.read_batch);
        self.ask_read_index_for(readers);
    }

    fn ask_read_index_for(&mut self, readers: Vec<Reader>) {
        let ctx = self.next_read;
        self.next_read += 1;
        self.node.read_index(ctx.to_le_bytes().to_vec());
        self.reads_asked.insert(ctx, (Instant::now(), readers));
    }

    /// Whether a round asked within `READ_INDEX_RETRY` is still unanswered.
    fn read_round_in_flight(&self) -> bool {
        self.reads_asked
            .values()
            .any(|(at, _)| at.elapsed() < READ_INDEX_RETRY)
    }

    /// Rounds nobody answered are asked again (a leader drops reads before its first commit),
    /// with the reads held behind them.
    fn retry_reads(&mut self) {
        let stale: Vec<u64> = self
            .reads_asked
            .iter()
            .filter(|(_, (at, _))| at.elapsed() >= READ_INDEX_RETRY)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            if let Some((_, mut readers)) = self.reads_asked.remove(&ctx) {
                readers.append(&mut self.read_batch);
                readers.retain(|r| !r.is_closed());
                if !readers.is_empty() {
                    self.ask_read_index_for(readers);
                }
            }
        }
    }

    /// Reads whose read index has been applied go ahead.
    fn release_reads(&mut self) {
        let applied = self.status.applied_index.load(Ordering::Acquire);
        while let Some(entry) = self.reads_ready.first_entry() {
            if *entry.key() > applied {
                break;
            }
            for r in entry.remove() {
                let _ = r.send(Ok(()));
            }
        }
    }

    /// After a leader change: proposals of older terms still waiting once the new leader's
    /// first entry has applied (and a grace for late forwards) were lost with the old leader.
    fn sweep_orphans(&mut self) {
        let Some(at) = self.orphan_sweep else { return };
        let term = self.node.raft.term;
        if Instant::now() < at || self.store.applied().1 != term {
            return;
        }
        self.orphan_sweep = None;
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (t, _))| *t < term)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some((_, tx)) = self.pending.remove(&id) {
                // Its fate is unknown to this member (a late forward could still commit it):
                // etcd's answer for exactly that.
                let _ = tx.send(Err(ApiError::TimeoutDueToLeaderFail));
            }
        }
    }

    /// Proposes the revocation of every expired lease (the leader's job, as etcd's).
    fn revoke_expired(&mut self) {
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        for id in self.leases.shared.take_expired() {
            self.propose_own(InternalRequest {
                lease_revoke: Some(keel_proto::pb::LeaseRevokeRequest { id }),
                ..Default::default()
            });
        }
    }

    /// Proposes the lease checkpoints due (the leader's job; etcd batches up to 1000).
    fn checkpoint_leases(&mut self) {
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        let due = self.leases.shared.take_checkpoints(1000);
        if due.is_empty() {
            return;
        }
        let req = InternalRequest {
            lease_checkpoint: Some(keel_proto::pb::LeaseCheckpointRequest {
                checkpoints: due
                    .into_iter()
                    .map(|(id, remaining_ttl)| keel_proto::pb::LeaseCheckpoint {
                        id,
                        remaining_ttl,
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        self.propose_own(req);
    }

    /// Proposes the writes held while there was no leader, once there is one.
    fn propose_leaderless(&mut self) {
        if self.leaderless.is_empty() || self.node.raft.leader_id == raft::INVALID_ID {
            return;
        }
        // A turn's worth at most, as the run loop drains (the rest goes next turn).
        let mut bytes = 0;
        while bytes <= BATCH_BYTES_MAX {
            let Some((_, p)) = self.leaderless.pop_front() else {
                break;
            };
            if !p.tx.is_closed() {
                bytes += p.data.len();
                self.propose(p);
            }
        }
    }

    /// Proposes a request of the leader's own (no client waits for its answer).
    fn propose_own(&mut self, req: InternalRequest) {
        let (tx, _) = oneshot::channel();
        self.propose(Proposal {
            data: req.encode_to_vec(),
            tx,
        });
    }

    fn propose(&mut self, p: Proposal) {
        self.last_proposal = Instant::now();
        self.collected = false;
        if self.node.raft.leader_id == raft::INVALID_ID {
            if self.leaderless.len() < LEADERLESS_MAX {
                self.leaderless.push_back((Instant::now(), p));
            } else {
                let _ = p.tx.send(Err(ApiError::NoLeader));
            }
            return;
        }
        self.batch.push(p);
    }

    /// Steps this turn's proposals into raft as one proposal message: a leader appends them
    /// at once and sends each follower one append for them all, and a follower forwards them
    /// to the leader in one message (raft-rs's `propose` takes one entry a message, and a
    /// leader answers each with an append to every follower). Each entry's context is its
    /// proposal ID; raft refusing the message (no leader, a leadership transfer) answers
    /// every one of them at once.
    fn flush_proposals(&mut self) {
        let mut batch = std::mem::take(&mut self.batch).into_iter().peekable();
        while batch.peek().is_some() {
            // One message of up to PROPOSE_MESSAGE_BYTES (a forwarded one is one peer frame).
            let mut bytes = 0;
            let mut part = Vec::new();
            while let Some(p) =
                batch.next_if(|p| part.is_empty() || bytes + p.data.len() <= PROPOSE_MESSAGE_BYTES)
            {
                bytes += p.data.len();
                part.push(p);
            }
            self.step_proposals(part);
        }
    }

    fn step_proposals(&mut self, part: Vec<Proposal>) {
        if self.node.raft.leader_id == raft::INVALID_ID {
            // This turn's messages from peers started an election after these came: held
            // for the next leader, as a write that finds no leader is.
            for p in part {
                self.propose(p);
            }
            return;
        }
        let (txs, data): (Vec<Responder>, Vec<Vec<u8>>) =
            part.into_iter().map(|p| (p.tx, p.data)).unzip();
        let from = self.node.raft.id;
        // With a leader known, raft refuses it during a leadership transfer or once this
        // leader leaves the configuration: every one is answered "no leader".
        self.track(txs, |node, first| {
            let entries: Vec<Entry> = (first..)
                .zip(data)
                .map(|(id, data)| Entry {
                    data: data.into(),
                    context: id.to_le_bytes().to_vec().into(),
                    ..Default::default()
                })
                .collect();
            let mut m = raft::eraftpb::Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = from;
            m.set_entries(entries.into());
            node.step(m)
        });
    }

    /// Proposes through `propose`, given the first of `txs.len()` new proposal IDs (each
    /// entry's context is its ID), and keeps each `tx` until its entry applies; raft refusing
    /// (no leader) answers them all at once.
    fn track(
        &mut self,
        txs: Vec<Responder>,
        propose: impl FnOnce(&mut RawNode<RaftLog>, u64) -> raft::Result<()>,
    ) {
        let first = self.next_id;
        self.next_id += txs.len() as u64;
        match propose(&mut self.node, first) {
            Ok(()) => {
                let term = self.node.raft.term;
                for (id, tx) in (first..).zip(txs) {
                    self.pending.insert(id, (term, tx));
                }
            }
            Err(_) => {
                for tx in txs {
                    let _ = tx.send(Err(ApiError::NoLeader));
                }
            }
        }
    }

    fn on_ready(&mut self) {
        self.flush_proposals();
        if !self.node.has_ready() {
            return;
        }
        let mut rd = self.node.ready();
        // Out first: a leader's appends reach followers while it writes its own WAL.
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install(&snap, rd.hs().cloned());
        }
        for rs in rd.take_read_states() {
            let ctx = <[u8; 8]>::try_from(rs.request_ctx.as_slice())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            if let Some((_, readers)) = self.reads_asked.remove(&ctx) {
                self.reads_ready
                    .entry(rs.index)
                    .or_default()
                    .extend(readers);
            }
        }
        self.apply_entries(rd.take_committed_entries());
        let spin = self.spinning();
        let log = self.node.mut_store();
        log.set_wal_spin(if spin { WAL_SPIN } else { Duration::ZERO });
        match rd.hs() {
            // A new commit index alone (a leader hearing acks, a follower a heartbeat: raft's
            // MustSync is false) is kept for the next write: a restart takes at least the
            // backend's applied index, and raft commits the rest of a durable log again. etcd
            // does not sync it either.
            Some(hs) if !rd.must_sync() => log.set_commit(hs.commit),
            None if rd.entries().is_empty() => {}
            hs => {
                if let Err(e) = log.append(rd.entries(), hs) {
                    // Like etcd: a WAL that cannot be written is fatal. Nothing unsynced was
                    // acked.
                    crate::fatal(crate::FATAL_EXIT_CODE, &format!("wal append failed: {e}"));
                }
            }
        }
        // A follower's acks go only once what they acknowledge is durable.
        self.send(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();
        self.publish();
        self.release_reads();
        self.check_transfers();
    }

    /// Hands messages to the peer transport; one that cannot be queued is reported to raft.
    fn send(&mut self, msgs: Vec<raft::eraftpb::Message>) {
        if msgs.is_empty() {
            return;
        }
        let Some(peers) = self.peers.clone() else {
            return;
        };
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(&peers, m);
                continue;
            }
            let frame = crate::cluster::raft_frame(&m);
            // The raft core's own connection, while it reads its peers itself (so its poll
            // sees the connection's room come back).
            if !self.links.is_empty()
                && goes_direct(m.get_msg_type(), frame.len())
                && peers.has_link(to)
            {
                match self.directs.send(to, &frame) {
                    Sent::Done => continue,
                    Sent::NotConnected { dial } => {
                        if dial {
                            let ctl = self._ctl_tx.clone();
                            peers.dial_frames(
                                to,
                                Box::new(move |s| {
                                    let _ = ctl.try_send(Control::Direct(to, s));
                                }),
                            );
                        }
                    }
                }
            }
            if !peers.send(to, frame) {
                self.node.report_unreachable(to);
            }
        }
        let mut lost = Vec::new();
        self.directs.flush(self.poll.registry(), &mut lost);
        self.resend(lost);
    }

    /// Sends through the transport what a direct connection that broke had not written.
    fn resend(&mut self, lost: Vec<(u64, Vec<bytes::Bytes>)>) {
        let Some(peers) = self.peers.clone() else {
            return;
        };
        for (to, frames) in lost {
            for frame in frames {
                if !peers.send(to, frame) {
                    self.node.report_unreachable(to);
                }
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if e.entry_type == EntryType::EntryConfChange {
                let result =
                    match <raft::eraftpb::ConfChange as protobuf::Message>::parse_from_bytes(
                        &e.data,
                    ) {
                        Ok(cc) => self.apply_conf(cc),
                        Err(err) => Err(ApiError::Internal(format!(
                            "conf change {} does not decode: {err}",
                            e.index
                        ))),
                    };
                self.answer(&e.context, result);
            }
            if e.entry_type == EntryType::EntryNormal && !e.data.is_empty() {
                fail::fail_point!("raft-apply");
                let result = match InternalRequest::decode(e.data.clone()) {
                    Ok(req) if req.member_attributes.is_some() => {
                        self.apply_attributes(req.member_attributes.unwrap_or_default())
                    }
                    Ok(req) if req.member_update.is_some() => {
                        self.apply_member_update(req.member_update.unwrap_or_default())
                    }
                    Ok(req) if req.lease_checkpoint.is_some() => {
                        let cps: Vec<(i64, i64)> = req
                            .lease_checkpoint
                            .unwrap_or_default()
                            .checkpoints
                            .iter()
                            .map(|c| (c.id, c.remaining_ttl))
                            .collect();
                        self.leases.checkpoint(&mut self.store, &cps);
                        // Nobody waits for this answer.
                        Ok(WriteResponse::Alarm(Default::default()))
                    }
                    Ok(req) => apply::apply(&mut self.store, &mut self.leases, req),
                    Err(err) => Err(ApiError::Internal(format!(
                        "raft entry {} does not decode: {err}",
                        e.index
                    ))),
                };
                self.answer(&e.context, result);
            }
            self.store.set_applied(e.index, e.term);
            self.status.applied_index.store(e.index, Ordering::Release);
        }
    }

    /// Answers whoever waits for the proposal an applied entry's context names (if it was
    /// made on this member).
    fn answer(&mut self, context: &[u8], result: Result<WriteResponse, ApiError>) {
        let id = <[u8; 8]>::try_from(context).map(u64::from_le_bytes);
        if let Some((_, tx)) = id.ok().and_then(|id| self.pending.remove(&id)) {
            let _ = tx.send(result);
            ANSWERED.fetch_add(1, Ordering::Release);
        }
    }

    /// Sends this member's state to `m.to`, which is behind the retained log, on a thread
    /// of its own and a connection of its own (the heartbeats go on meanwhile). The state is
    /// the backend as of a durable commit at or after the snapshot raft asked for; the
    /// message's metadata is rewritten to say which entry it ends with.
    fn send_snapshot(&mut self, peers: &Arc<Peers>, mut m: raft::eraftpb::Message) {
        let to = m.to;
        let want = m.get_snapshot().get_metadata().index;
        let handle = self.store.handle();
        let (peers, ctl) = (peers.clone(), self._ctl_tx.clone());
        let spawned = std::thread::Builder::new()
            .name("keel-snap-send".into())
            .spawn(move || {
                let report = ctl.clone();
                let fail = move |why: String| {
                    tracing::warn!(to = format!("{to:x}"), "sending the state failed: {why}");
                    let _ = report.send(Control::SnapshotSent(to, false));
                };
                let deadline = Instant::now() + Duration::from_secs(30);
                while handle.persisted() < want && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let Some(out) = handle.outgoing() else {
                    return fail("no backend".into());
                };
                let (index, term) = match out.point() {
                    Ok(p) if p.0 >= want => p,
                    Ok(p) => return fail(format!("the backend holds {} < {want}", p.0)),
                    Err(e) => return fail(e.to_string()),
                };
                let members = match out.members().map(|b| b.map(|b| Membership::decode(&b))) {
                    Ok(Some(Ok(m))) => m,
                    _ => return fail("the state has no membership".into()),
                };
                let meta = m.mut_snapshot().mut_metadata();
                meta.index = index;
                meta.term = term;
                meta.set_conf_state(crate::cluster::conf_state(&members));
                tracing::info!(
                    to = format!("{to:x}"),
                    index,
                    term,
                    "sending this member's state to a member behind the log"
                );
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                peers.send_stream(
                    to,
                    rx,
                    Box::new(move |ok| {
                        tracing::info!(to = format!("{to:x}"), ok, "state sent");
                        // On the peer runtime: never block it (a lost report is recovered
                        // by raft from the member's next answer).
                        let _ = ctl.try_send(Control::SnapshotSent(to, ok));
                    }),
                );
                if tx.blocking_send(crate::cluster::raft_frame(&m)).is_err() {
                    return;
                }
                // A failure midway drops `tx` before the end frame: the receiver refuses it.
                let _ = out.send(|chunk| tx.blocking_send(bytes::Bytes::from(chunk)).is_ok());
            });
        if spawned.is_err() {
            self.node.report_snapshot(to, SnapshotStatus::Failure);
        }
    }

    /// Installs the state the leader sent (already written to the incoming backend file):
    /// durably, in an order a crash at any point recovers from (see `crate::install`), then
    /// the process starts over on it.
    fn install(&mut self, snap: &raft::eraftpb::Snapshot, hs: Option<raft::eraftpb::HardState>) {
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        tracing::info!(
            index,
            term,
            "installing the leader's state; restarting on it"
        );
        let paths = crate::install::Paths::new(&self.db_path);
        // Only the state this member received for exactly this snapshot is installed.
        let received = match self.incoming.take() {
            Some((point, path)) if point == (index, term) => path,
            other => crate::fatal(
                crate::FATAL_EXIT_CODE,
                &format!(
                    "raft accepted the leader's state at ({index}, {term}) but the state \
                     received is {:?}",
                    other.map(|(p, _)| p)
                ),
            ),
        };
        if let Err(e) = paths.stage(&received, (index, term)) {
            crate::fatal(
                crate::FATAL_EXIT_CODE,
                &format!("installing a state: {e:#}"),
            );
        }
        if let Err(e) = self.node.mut_store().install_snapshot(
            index,
            term,
            meta.get_conf_state().clone(),
            hs.as_ref(),
        ) {
            crate::fatal(crate::FATAL_EXIT_CODE, &format!("wal append failed: {e}"));
        }
        if let Err(e) = paths.switch() {
            crate::fatal(
                crate::FATAL_EXIT_CODE,
                &format!("installing a state: {e:#}"),
            );
        }
        crate::install::restart();
    }

    fn propose_conf(&mut self, cc: raft::eraftpb::ConfChange, tx: Responder) {
        // raft-rs would turn a second change into an empty entry (and our caller would wait
        // for nothing); etcd's caller times out the same way.
        if self.node.raft.state == StateRole::Leader && self.node.raft.has_pending_conf() {
            let _ = tx.send(Err(ApiError::Timeout));
            return;
        }
        self.track(vec![tx], |node, id| {
            node.propose_conf_change(id.to_le_bytes().to_vec(), cc)
        });
    }

    /// `--auto-promote-learners`: the leader promotes a learner once it has caught up, one
    /// change at a time.
    fn auto_promote(&mut self) {
        if !self.auto_promote
            || self.node.raft.state != StateRole::Leader
            || self.node.raft.has_pending_conf()
        {
            return;
        }
        let ready = self.membership.get().iter().find_map(|m| {
            let matched = self.node.raft.prs().get(m.id).map_or(0, |p| p.matched);
            let caught_up = (matched as f64) >= (self.node.raft.raft_log.last_index() as f64) * 0.9;
            (m.is_learner && !m.name.is_empty() && caught_up).then_some(m.id)
        });
        if let Some(id) = ready {
            tracing::info!(
                member = format!("{id:x}"),
                "promoting a learner that caught up"
            );
            let (tx, _) = oneshot::channel();
            self.promote(id, tx);
        }
    }

    /// MemberPromote on the leader: only a learner that has caught up (etcd: its match index
    /// at least 90% of the leader's) becomes a voter.
    fn promote(&mut self, id: u64, tx: Responder) {
        if self.node.raft.state != StateRole::Leader {
            let _ = tx.send(Err(ApiError::LeaderChanged));
            return;
        }
        let members = self.membership.get();
        let Some(m) = members.iter().find(|m| m.id == id) else {
            let _ = tx.send(Err(ApiError::MemberNotFound));
            return;
        };
        if !m.is_learner {
            let _ = tx.send(Err(ApiError::MemberNotLearner));
            return;
        }
        let raft = &self.node.raft;
        let leader_match = raft.raft_log.last_index();
        let learner_match = raft.prs().get(id).map_or(0, |p| p.matched);
        if (learner_match as f64) < (leader_match as f64) * 0.9 {
            let _ = tx.send(Err(ApiError::LearnerNotReady));
            return;
        }
        // etcd's IsReadyToPromoteMember: the voters that have started, with the learner,
        // must be a quorum of the voters it will be one of.
        let (voters, started) = crate::cluster::started_voters(&members, None);
        let (n, started) = (voters + 1, started + 1);
        if self.strict_reconfig && started <= n / 2 {
            let _ = tx.send(Err(ApiError::MemberNotEnoughStarted));
            return;
        }
        let cc = raft::eraftpb::ConfChange {
            change_type: raft::eraftpb::ConfChangeType::AddNode,
            node_id: id,
            ..Default::default()
        };
        self.propose_conf(cc, tx);
    }

    /// etcd's MoveLeader: only the leader can, only to a voter; answered once the target
    /// leads (or after `TRANSFER_TIMEOUT`).
    fn move_leader(&mut self, target: u64, tx: Responder) {
        if self.node.raft.state != StateRole::Leader {
            let _ = tx.send(Err(ApiError::NotLeader));
            return;
        }
        let voter = self
            .membership
            .get()
            .iter()
            .any(|m| m.id == target && !m.is_learner);
        if !voter {
            let _ = tx.send(Err(ApiError::BadLeaderTransferee));
            return;
        }
        if target == self.node.raft.id {
            let _ = tx.send(Ok(WriteResponse::Alarm(Default::default())));
            return;
        }
        tracing::info!(target = format!("{target:x}"), "moving leadership");
        self.node.transfer_leader(target);
        self.transfers
            .push((target, Instant::now() + TRANSFER_TIMEOUT, tx));
    }

    /// Hands leadership to the voter, among those heard from within the last election timeout
    /// (check-quorum's `recent_active`), whose log matches the most of this leader's (the one
    /// that can take over soonest); answered once it leads, at once if there is none.
    fn step_down(&mut self, tx: Responder) {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            let _ = tx.send(Ok(WriteResponse::Alarm(Default::default())));
            return;
        }
        let me = raft.id;
        let target = self
            .membership
            .get()
            .iter()
            .filter(|m| m.id != me && !m.is_learner)
            .filter_map(|m| raft.prs().get(m.id).map(|p| (p, m.id)))
            .filter(|(p, _)| p.recent_active)
            .map(|(p, id)| (p.matched, id))
            .max();
        match target {
            Some((_, id)) => self.move_leader(id, tx),
            None => {
                tracing::info!("skipped leadership transfer: no other voting member reachable");
                let _ = tx.send(Ok(WriteResponse::Alarm(Default::default())));
            }
        }
    }

    /// Answers MoveLeader calls whose target now leads, or that took too long.
    fn check_transfers(&mut self) {
        if self.transfers.is_empty() {
            return;
        }
        let leader = self.status.leader_id.load(Ordering::Acquire);
        let now = Instant::now();
        let mut waiting = Vec::new();
        for (target, deadline, tx) in std::mem::take(&mut self.transfers) {
            if leader == target {
                let _ = tx.send(Ok(WriteResponse::Alarm(Default::default())));
            } else if now >= deadline {
                let _ = tx.send(Err(ApiError::LeaderTransferTimeout));
            } else {
                waiting.push((target, deadline, tx));
            }
        }
        self.transfers = waiting;
    }

    /// Applies a membership change (the same on every member): the members list, raft's
    /// configuration and the peer links.
    fn apply_conf(&mut self, cc: raft::eraftpb::ConfChange) -> Result<WriteResponse, ApiError> {
        use raft::eraftpb::ConfChangeType;
        let mut members = self.membership.get().to_vec();
        let id = cc.node_id;
        // etcd's ErrIDRemoved: a removed ID never comes back (answered "member not found").
        if self.membership.is_removed(id) {
            return Err(ApiError::MemberNotFound);
        }
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                let learner = cc.get_change_type() == ConfChangeType::AddLearnerNode;
                // A promotion names an existing learner and carries no member.
                let promotion = cc.context.is_empty();
                match members.iter_mut().find(|m| m.id == id) {
                    Some(m) if promotion && !learner && m.is_learner => m.is_learner = false,
                    Some(m) if promotion && !m.is_learner => {
                        return Err(ApiError::MemberNotLearner)
                    }
                    Some(_) => return Err(ApiError::MemberExists),
                    None if promotion => return Err(ApiError::MemberNotFound),
                    None => {
                        let m = keel_proto::keelpb::Member::decode(cc.context.as_ref())
                            .map_err(|e| ApiError::Internal(format!("member add: {e}")))?;
                        if members
                            .iter()
                            .any(|o| o.peer_urls.iter().any(|u| m.peer_urls.contains(u)))
                        {
                            return Err(ApiError::PeerUrlExists);
                        }
                        if learner && members.iter().filter(|m| m.is_learner).count() >= 1 {
                            return Err(ApiError::TooManyLearners);
                        }
                        members.push(m);
                    }
                }
            }
            ConfChangeType::RemoveNode => {
                let before = members.len();
                members.retain(|m| m.id != id);
                if members.len() == before {
                    return Err(ApiError::MemberNotFound);
                }
            }
        }
        let cs = self
            .node
            .apply_conf_change(&cc)
            .map_err(|e| ApiError::Internal(format!("membership change: {e}")))?;
        self.node.mut_store().set_conf_state(cs);
        if cc.get_change_type() == ConfChangeType::RemoveNode {
            self.membership.remove(id);
            // Its links here are told and closed: a member that missed its own removal (down
            // or cut off when it was committed) dials again, is refused, and stops.
            let from_it: Vec<usize> = self
                .links
                .iter()
                .filter(|(_, l)| l.from() == id)
                .map(|(t, _)| *t)
                .collect();
            for t in from_it {
                if let Some(l) = self.links.get(&t) {
                    l.tell_removed();
                }
                self.drop_link(t);
            }
        }
        self.set_members(members);
        tracing::info!(
            change = ?cc.get_change_type(),
            member = format!("{id:x}"),
            "applied a membership change"
        );
        if cc.get_change_type() == ConfChangeType::RemoveNode && id == self.node.raft.id {
            // etcd's removed member stops; give the answers of this turn time to go out.
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                crate::fatal(0, crate::cluster::REMOVED);
            });
        }
        Ok(WriteResponse::Alarm(Default::default()))
    }

    /// Cluster.MemberUpdate: a member's new peer URLs.
    fn apply_member_update(
        &mut self,
        u: keel_proto::keelpb::MemberUpdate,
    ) -> Result<WriteResponse, ApiError> {
        let mut members = self.membership.get().to_vec();
        if !members.iter().any(|m| m.id == u.id) {
            return Err(ApiError::MemberNotFound);
        }
        if members
            .iter()
            .any(|m| m.id != u.id && m.peer_urls.iter().any(|p| u.peer_urls.contains(p)))
        {
            return Err(ApiError::PeerUrlExists);
        }
        for m in members.iter_mut().filter(|m| m.id == u.id) {
            m.peer_urls = u.peer_urls.clone();
        }
        self.set_members(members);
        Ok(WriteResponse::Alarm(Default::default()))
    }

    /// Installs a new members list: stored with the state, published, and the peer links
    /// follow it (a lone member starts its transport when it gets company).
    fn set_members(&mut self, members: Vec<keel_proto::keelpb::Member>) {
        let me = self.node.raft.id;
        self.store.set_members(crate::cluster::Membership::encode(
            &members,
            &self.membership.removed(),
        ));
        self.status
            .multi
            .store(members.len() > 1, Ordering::Release);
        self.status.learner.store(
            members.iter().any(|m| m.id == me && m.is_learner),
            Ordering::Release,
        );
        if members.len() > 1 && self.peers.is_none() {
            if let Some(start) = self.start_peers.take() {
                match start() {
                    Ok(p) => self.peers = Some(p),
                    Err(e) => tracing::error!("cannot start the peer transport: {e:#}"),
                }
            }
        }
        if let Some(peers) = &self.peers {
            for m in members.iter().filter(|m| m.id != me) {
                peers.connect(m.id, m.peer_urls.clone());
            }
            for old in self.membership.get().iter() {
                if !members.iter().any(|m| m.id == old.id) {
                    peers.disconnect(old.id);
                }
            }
        }
        self.membership.set(members);
    }

    /// A member's published name and client URLs (etcd's ClusterMemberAttrSet).
    fn apply_attributes(
        &mut self,
        a: keel_proto::keelpb::MemberAttributes,
    ) -> Result<WriteResponse, ApiError> {
        let mut members = self.membership.get().to_vec();
        if crate::cluster::set_attributes(&mut members, &a) {
            self.set_members(members);
        }
        // Nobody reads this answer (the publisher only waits for it to apply).
        Ok(WriteResponse::Alarm(Default::default()))
    }

    /// A backend batch old or large enough goes to disk (between two applied entries); every
    /// `snapshot_count` entries made durable there, a snapshot releases the WAL before it.
    fn commit_backend_if_due(&mut self) {
        match self.store.commit_if_due(Instant::now()) {
            Ok(true) => self.publish(),
            Ok(false) => {}
            // Like a WAL write, a backend that cannot be written is fatal.
            Err(e) => crate::fatal(
                crate::FATAL_EXIT_CODE,
                &format!("backend commit failed: {e}"),
            ),
        }
        let durable = self.store.persisted();
        if durable >= self.last_snapshot + self.snapshot_count {
            self.last_snapshot = durable;
            let upto = durable.saturating_sub(self.catchup_entries);
            match self.node.mut_store().release(upto) {
                Ok(0) => {}
                Ok(n) => tracing::info!(snapshot_index = durable, segments = n, "released wal"),
                Err(e) => crate::fatal(
                    crate::FATAL_EXIT_CODE,
                    &format!("releasing wal segments failed: {e}"),
                ),
            }
        }
    }

    fn publish(&mut self) {
        let raft = &self.node.raft;
        self.status.term.store(raft.term, Ordering::Release);
        self.status
            .commit_index
            .store(raft.raft_log.committed, Ordering::Release);
        let leading = raft.state == StateRole::Leader;
        let leader = if leading { raft.id } else { raft.leader_id };
        self.status.leader_id.store(leader, Ordering::Release);
        if (raft.term, leader) != self.seen {
            let first = self.seen == (0, 0);
            self.seen = (raft.term, leader);
            if !first {
                tracing::info!(
                    term = raft.term,
                    leader = format!("{leader:x}"),
                    "leader changed"
                );
                // Reads asked of the old leader: etcd answers them "leader changed".
                for (_, (_, readers)) in self.reads_asked.drain() {
                    for r in readers {
                        let _ = r.send(Err(ApiError::LeaderChanged));
                    }
                }
                self.orphan_sweep = Some(Instant::now() + ORPHAN_GRACE);
            }
        }
        if leading != self.was_leader {
            self.was_leader = leading;
            if leading {
                // etcd's Promote: the leases run again, each from a full TTL plus an election
                // timeout, since the old leader's clock is lost.
                self.leases.shared.promote(self.election_timeout);
            } else {
                self.leases.shared.demote();
            }
        }
        // The alarms' lock is taken only when they changed (rarely), never per turn.
        if self.store.alarms_epoch() != self.alarms_epoch {
            self.alarms_epoch = self.store.alarms_epoch();
            *self.status.alarms.lock().expect("alarms lock") = self.store.alarms().to_vec();
        }

        let applied = self.status.applied_index.load(Ordering::Acquire);
        self.node.mut_store().compact_applied(applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A net core polls for an answer only while a few of its own callers wait, and only
    /// in a lone member.
    #[test]
    fn a_net_core_polls_only_for_a_few_waiting_callers_of_a_lone_member() {
        let waiting = || WAITING.with(|w| w.get());
        assert_eq!(waiting(), 0);
        assert!(!polls_for_answer(waiting(), false), "nobody waits");
        let a = Waiting::start();
        assert!(polls_for_answer(waiting(), false));
        assert!(!polls_for_answer(waiting(), true), "a member of a cluster");
        let more: Vec<Waiting> = (0..NET_SPIN_CALLERS_MAX)
            .map(|_| Waiting::start())
            .collect();
        assert!(!polls_for_answer(waiting(), false), "many callers wait");
        drop(more);
        drop(a);
        assert_eq!(waiting(), 0, "a caller that stops waiting is not counted");
        // Another thread's callers are its own.
        let other = std::thread::spawn(|| {
            let _w = Waiting::start();
            WAITING.with(|w| w.get())
        });
        assert_eq!(other.join().unwrap(), 1);
        assert_eq!(waiting(), 0);

        // The poll ends when an answer comes (long before a generous bound), and returns at
        // once when nobody waits.
        let multi = std::sync::atomic::AtomicBool::new(false);
        let t = Instant::now();
        spin_for_answer(&multi);
        assert!(t.elapsed() < NET_SPIN, "nobody waits: no poll");
        let _w = Waiting::start();
        let t = Instant::now();
        spin_for_answer(&multi);
        assert!(t.elapsed() >= NET_SPIN, "no answer: the whole poll");
    }
}
