//! `keel`: a drop-in etcd v3 endpoint. This file wires the cores: it resolves the
//! configuration, opens the WAL, starts the raft core (pinned, owns raft + WAL + apply) and
//! one tokio runtime per net core (pinned, SO_REUSEPORT listener each), and serves once the
//! state has been rebuilt from the WAL.

mod apply;
mod autocompact;
mod backend;
mod bell;
mod cluster;
mod concurrency;
mod config;
mod direct;
mod ids;
mod install;
mod lease;
mod migrate;
mod placement;
mod raft_core;
mod range_stream;
mod read_gate;
mod snapshot;
mod watch;

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_storage::raftlog::{MemberMeta, RaftLog};
use keel_storage::store::{Store, StoreOptions};
use keel_storage::wal::WalOptions;
use raft::Storage;

use crate::backend::NodeBackend;
use crate::config::{Config, ETCD_API_VERSION};
use crate::raft_core::{RaftCore, RaftStatus};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Proposals waiting for the raft core at most; beyond, writes get "too many requests".
const PROPOSAL_QUEUE_MAX: usize = 16 * 1024;

/// mimalloc's `arena_eager_commit` (option 4 in its C enum).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Runs before `main` (and before the Rust runtime's first allocation reserves an arena):
/// mimalloc commits arena memory as it is used instead of eagerly. Measured here: 8 instead of
/// 16 MiB RSS idle, 74 instead of 83-88 MiB after 100k puts, same throughput. Set in `main`
/// it comes too late to matter.
#[used]
#[unsafe(link_section = ".init_array")]
static MIMALLOC_OPTIONS: extern "C" fn() = {
    extern "C" fn lazy_commit() {
        // SAFETY: sets a process-wide allocator option before any allocation.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    lazy_commit
};

/// Exit status after a panic (Go's, so etcd's, for a panic).
pub const PANIC_EXIT_CODE: i32 = 2;
/// Exit status after a fatal condition that is not a panic.
pub const FATAL_EXIT_CODE: i32 = 1;

/// Ends the whole process now, saying why. A node with a dead core must not keep answering
/// reads and health checks: exiting lets systemd's `Restart=on-failure` restart it. `_exit`
/// runs no atexit handler or destructor, so nothing half-torn-down runs on the way out;
/// nothing needs flushing (the WAL is durable per write, logs go unbuffered to stderr).
pub fn fatal(code: i32, why: &str) -> ! {
    tracing::error!("fatal: {why}; exiting");
    eprintln!("keel: fatal: {why}; exiting");
    // SAFETY: terminates the process; no Rust state is used afterwards.
    unsafe { libc::_exit(code) }
}

/// A panic on any thread (raft core, net core, a tokio task) takes the process down.
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        fatal(PANIC_EXIT_CODE, &format!("panic on thread {name}: {info}"));
    }));
}

fn main() -> ExitCode {
    exit_on_panic();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("snapshot") => return snapshot::snapshot_main(args[1..].to_vec()),
        Some("migrate") => return snapshot::migrate_main(args[1..].to_vec()),
        _ => {}
    }
    let cfg = match Config::load(args) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("keel Version: {}", env!("CARGO_PKG_VERSION"));
            println!("etcd API Version: {ETCD_API_VERSION}");
            println!(
                "OS/Arch: {}/{}",
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<clap::Error>() {
                ce.exit();
            }
            eprintln!("keel: {e:#}");
            return ExitCode::from(1);
        }
    };
    init_logging(&cfg.log_level);
    warn_unknown_env();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("keel: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// etcd warns about ETCD_* variables it does not know; so do we.
fn warn_unknown_env() {
    let known: Vec<String> = <config::Flags as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_") && !known.contains(&k) && k != "ETCDCTL_API" {
            tracing::warn!(variable = %k, "unrecognized environment variable");
        }
    }
}

/// Holds an exclusive lock on the data dir for the life of the process.
pub fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let member = data_dir.join("member");
    std::fs::create_dir_all(&member)
        .with_context(|| format!("cannot create data dir {}", member.display()))?;
    let path = member.join("keel.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !try_lock(&f) {
        anyhow::bail!(
            "data dir {} is in use by another keel process",
            data_dir.display()
        );
    }
    Ok(f)
}

/// Takes an exclusive flock on `f` if nobody holds one (released when `f` closes).
pub fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on an fd the caller owns.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The initial members and this member's meta, as `--initial-cluster` bootstraps them.
fn initial_members(cfg: &Config) -> (Vec<keel_proto::keelpb::Member>, MemberMeta) {
    cluster::bootstrap(&cfg.initial_cluster, &cfg.initial_cluster_token, &cfg.name)
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    match cfg.quota_backend_bytes {
        None => tracing::warn!("disabling backend quota"),
        Some(q) if q > config::MAX_RECOMMENDED_QUOTA_BYTES => tracing::warn!(
            "backend quota {q} exceeds maximum recommended quota {}",
            config::MAX_RECOMMENDED_QUOTA_BYTES
        ),
        Some(_) => {}
    }
    if cfg.max_request_bytes > config::RECOMMENDED_MAX_REQUEST_BYTES {
        tracing::warn!(
            max_request_bytes = cfg.max_request_bytes,
            recommended_request_bytes = config::RECOMMENDED_MAX_REQUEST_BYTES,
            "exceeded recommended request limit"
        );
    }
    let cfg = Arc::new(cfg);
    let net_cores = cfg.cores.saturating_sub(1).max(1);

    // Bind first, so a taken port fails fast; accept only once the state is rebuilt. Peer
    // ports first, as etcd, and even alone (its transport starts once it has company).
    let peer_listeners = cfg
        .listen_peer
        .iter()
        .map(|addr| {
            keel_net::serve::listen_exclusive(*addr).with_context(|| format!("listen tcp {addr}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for addr in &cfg.listen_client {
        keel_net::serve::ensure_free(*addr).with_context(|| format!("listen tcp {addr}"))?;
    }
    let mut listeners = Vec::new();
    for _ in 0..net_cores {
        let mut per_core = Vec::new();
        for addr in &cfg.listen_client {
            let l = keel_net::serve::bind_reuseport(*addr)
                .with_context(|| format!("listen tcp {addr}"))?;
            per_core.push(l);
        }
        listeners.push(per_core);
    }

    let started = Instant::now();
    // An etcd member's data dir (say, what `etcdctl snapshot restore` made) becomes Keel's.
    migrate::adopt(&cfg).context("take over the etcd data dir")?;
    // The backend first: the WAL is read from the entry after its consistent index.
    let db_path = cfg.db_path();
    let store_opts = StoreOptions {
        commit_interval: cfg.backend_batch_interval,
        commit_ops_max: cfg.backend_batch_limit,
    };
    let open_store = || {
        Store::open(&db_path, store_opts)
            .with_context(|| format!("open backend {}", db_path.display()))
    };
    let mut store = open_store()?;
    let wal_opts = WalOptions {
        segment_bytes: cfg.wal_segment_bytes,
        ..WalOptions::default()
    };
    let new_wal = keel_storage::wal::list_segments(&cfg.wal_dir)
        .map(|s| s.is_empty())
        .unwrap_or(true);
    // A new member of an existing cluster learns its ID and the members from them.
    let (bootstrap, joined) = if new_wal && cfg.initial_cluster_state == "existing" {
        let (meta, members) = join_meta(&cfg)?;
        (meta, Some(members))
    } else {
        (initial_members(&cfg).1, None)
    };
    let (mut log, fresh) =
        RaftLog::open(&cfg.wal_dir, wal_opts, bootstrap, store.applied()).context("open wal")?;
    // A state from the leader whose install a crash interrupted is finished now.
    let install = install::Paths::new(&db_path);
    if install.recover(log.installed().map(|s| s.0), store.applied().0)? {
        drop(store);
        store = open_store()?;
        tracing::info!(
            consistent_index = store.applied().0,
            "finished installing the leader's state"
        );
    }
    let mvcc = store.mvcc().clone();
    let store_handle = store.handle();
    tracing::info!(
        backend = %db_path.display(),
        consistent_index = store.applied().0,
        revision = mvcc.current_rev(),
        open_ms = started.elapsed().as_millis() as u64,
        "opened backend"
    );
    if fresh {
        tracing::info!(joining = joined.is_some(), "created a new member");
    }
    // Recovery read the retained WAL and the backend's records through temporary buffers:
    // hand what they freed back to the OS now rather than carry it in RSS.
    return_freed_memory();
    let meta = log.meta().clone();
    let irq_cpu = placement::disk_irq_cpu(&cfg.wal_dir);
    let (raft_cpu, net_cpus) = placement::plan(cfg.cores, irq_cpu);
    tracing::info!(?irq_cpu, ?raft_cpu, ?net_cpus, "core placement");
    let last_index = log.last_index()?;
    tracing::info!(
        member_id = format!("{:x}", meta.member_id),
        cluster_id = format!("{:x}", meta.cluster_id),
        wal = %cfg.wal_dir.display(),
        first_index = log.first_index()?,
        last_index,
        segments = log.segments().len(),
        fresh,
        snapshot_count = cfg.snapshot_count,
        "opened wal"
    );

    let status = Arc::new(RaftStatus::default());
    let hub = watch::hub();
    let mut store = store;
    store.set_event_sink(Box::new(watch::HubSink(hub.clone())));
    let (members, removed) = match (store.members(), joined) {
        (Some(b), _) => {
            let (m, removed) =
                cluster::Membership::decode_with_removed(b).context("the stored membership")?;
            // Raft's configuration as of the backend; later changes replay from the WAL. A
            // member that joined and has not received the leader's state yet has none.
            let awaiting_state = log.meta().voters.is_empty() && store.applied().0 == 0;
            if !awaiting_state {
                log.set_conf_state(cluster::conf_state(&m));
            }
            // Removed, and started again on its old data: as etcd's (whose peers answer such
            // a member "gone"), stop. IDs are never given out again, so this one is out for
            // good.
            if !awaiting_state && !m.iter().any(|x| x.id == meta.member_id) {
                fatal(0, cluster::REMOVED);
            }
            (m, removed)
        }
        // Joining: the members as the cluster told them, kept (a restart before the leader's
        // state arrives must not fall back to --initial-cluster's IDs); raft's configuration
        // comes with the leader's state.
        (None, Some(m)) => {
            store.set_members(cluster::Membership::encode(&m, &[]));
            store.commit().context("store the joined membership")?;
            (m, Vec::new())
        }
        // Joined, but died before keeping the membership: ask again.
        (None, None) if log.meta().voters.is_empty() => {
            let (_, m) = join_meta(&cfg)?;
            store.set_members(cluster::Membership::encode(&m, &[]));
            store.commit().context("store the joined membership")?;
            (m, Vec::new())
        }
        (None, None) => {
            let mut m = initial_members(&cfg).0;
            if let [only] = m.as_mut_slice() {
                // A lone member need not wait for its own publication to list its URLs.
                only.client_urls = cfg.advertise_client_urls.clone();
            }
            store.set_members(cluster::Membership::encode(&m, &[]));
            (m, Vec::new())
        }
    };
    let membership = Arc::new(cluster::Membership::new(members, removed));
    let multi = membership.get().len() > 1;
    status.multi.store(multi, Ordering::Release);
    status.learner.store(
        membership
            .get()
            .iter()
            .any(|m| m.id == meta.member_id && m.is_learner),
        Ordering::Release,
    );
    let leases = Arc::new(lease::Leases::new(
        meta.member_id,
        cfg.heartbeat_ms,
        cfg.election_ms,
    ));
    if let Some(every) = cfg.lease_checkpoint {
        leases.set_checkpointing(every);
    }
    // Leading from now on: every lease gets its full TTL plus an election timeout (etcd's
    // Promote).
    let book = lease::LeaseBook::recover(
        leases.clone(),
        &mut store,
        Duration::from_millis(cfg.election_ms),
    );
    // The raft core parks on this poll while it reads peer links itself; senders ring.
    let poll = mio::Poll::new()?;
    let bell = bell::Bell::new(&poll)?;
    let (tx, rx) = crossbeam_channel::bounded(PROPOSAL_QUEUE_MAX);
    let tx = bell::Tx::new(tx, bell.clone());
    let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(raft_core::CONTROL_QUEUE_MAX);
    let ctl_tx = bell::Tx::new(ctl_tx, bell.clone());
    let forwarder = Arc::new(cluster::LeaseForwarder::new());
    let start: raft_core::PeerStarter = {
        let inbound = Arc::new(cluster::PeerInbound {
            control: ctl_tx.clone(),
            leases: leases.clone(),
            status: status.clone(),
            member_id: meta.member_id,
            forwarder: forwarder.clone(),
            peers: std::sync::OnceLock::new(),
            db_path: cfg.db_path(),
            receiving: std::sync::Mutex::new(()),
            membership: membership.clone(),
            cluster_id: meta.cluster_id,
        });
        let (cfg, meta, forwarder) = (cfg.clone(), meta.clone(), forwarder.clone());
        let membership = membership.clone();
        Box::new(move || {
            let peers = start_peers(&cfg, &meta, peer_listeners, inbound.clone())?;
            let _ = inbound.peers.set(peers.clone());
            let _ = forwarder.peers.set(peers.clone());
            for m in membership.get().iter().filter(|m| m.id != meta.member_id) {
                peers.connect(m.id, m.peer_urls.clone());
            }
            Ok(peers)
        })
    };
    // A lone member runs the peer transport only once it has company (a member added).
    let (peers, start_peers_later) = if multi {
        (Some(start()?), None)
    } else {
        (None, Some(start))
    };
    // What this member must have applied before it serves: everything in its WAL when it is
    // alone; everything known committed when it is one of several (the rest comes from the
    // leader, whom clients may wait for).
    let replay_to = if multi {
        log.initial_state()?.hard_state.commit
    } else {
        last_index
    };
    let core = RaftCore::new(
        log,
        store,
        book,
        status.clone(),
        rx,
        raft_core::Links {
            control: (ctl_tx.clone(), ctl_rx),
            peers,
            membership: membership.clone(),
            start_peers: start_peers_later,
            poll: (poll, bell),
        },
        &cfg,
    )?;
    let raft_thread = std::thread::Builder::new()
        .name("keel-raft".into())
        .spawn(move || {
            if let Some(id) = raft_cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id });
            }
            core.run()
        })?;

    // Serve only after replay (and, alone, once leading).
    while status.applied_index.load(Ordering::Acquire) < replay_to
        || (!multi && status.leader_id.load(Ordering::Acquire) != meta.member_id)
    {
        if raft_thread.is_finished() {
            anyhow::bail!("raft core stopped during start-up");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    tracing::info!(
        revision = mvcc.current_rev(),
        replay_ms = started.elapsed().as_millis() as u64,
        "state rebuilt from wal"
    );

    let watch = Arc::new(watch::WatchContext {
        mvcc: mvcc.clone(),
        hub,
        status: status.clone(),
        cluster_id: meta.cluster_id,
        member_id: meta.member_id,
        max_request_bytes: cfg.max_request_bytes,
        // etcd raises anything shorter to 100 ms.
        progress_interval: cfg
            .watch_progress_notify_interval
            .max(Duration::from_millis(100)),
    });
    let backend = Arc::new(NodeBackend {
        control: ctl_tx,
        membership,
        forwarder,
        mvcc,
        watch,
        leases,
        status,
        proposals: tx,
        member_id: meta.member_id,
        cfg: cfg.clone(),
        store: store_handle,
    });
    // Before the member serves or reports ready: a stop from then on hands leadership over.
    stop_on_signals(backend.clone())?;
    if multi {
        // Like etcd, a member of a cluster serves clients only once it has published itself
        // through raft: it then knows a leader and has caught up with the log.
        tracing::info!("publishing this member to the cluster before serving clients");
        publish_attributes(&backend);
    }
    for (i, per_core) in listeners.into_iter().enumerate() {
        let backend = backend.clone();
        let pin = net_cpus[i].map(|id| core_affinity::CoreId { id });
        std::thread::Builder::new()
            .name(format!("keel-net-{i}"))
            .spawn(move || net_core(pin, per_core, backend))?;
    }
    if let Some(mode) = cfg.auto_compaction {
        let backend = backend.clone();
        std::thread::Builder::new()
            .name("keel-autocompact".into())
            .spawn(move || auto_compact(mode, backend))?;
    }
    tracing::info!(
        addrs = ?cfg.listen_client,
        cores = cfg.cores,
        "ready to serve client requests"
    );
    if multi {
        notify_systemd();
    } else {
        std::thread::Builder::new()
            .name("keel-publish".into())
            .spawn(move || {
                publish_attributes(&backend);
                notify_systemd();
            })?;
    }
    // Nothing here returns while the node is healthy: a core that stops is fatal.
    let _ = raft_thread.join();
    fatal(FATAL_EXIT_CODE, "raft core stopped");
}

/// A new member of an existing cluster (`--initial-cluster-state existing`, etcd's member
/// add then start): asks the other members named in `--initial-cluster` what the cluster is,
/// and finds itself by its peer URLs (the ID was chosen when it was added).
/// How long a stopping leader waits for its leadership to move (etcd: its request timeout).
const STOP_TRANSFER_LIMIT: Duration = Duration::from_secs(8);

/// etcd's stop on SIGTERM or SIGINT: a leader first hands leadership to its most caught-up
/// voter, so the others need not wait out an election timeout (a rolling restart under
/// systemd stops each member this way); then the process ends by the signal, as etcd's does.
/// Every acknowledged write is already on disk, so nothing else needs flushing.
fn stop_on_signals(backend: Arc<NodeBackend>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Handlers are in place before this returns.
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("keel-signals".into())
        .spawn(move || {
            let sig = rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => libc::SIGTERM,
                    _ = int.recv() => libc::SIGINT,
                }
            });
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            tracing::info!(signal = name, "received signal; stopping");
            // A member that does not lead has nothing to hand over: it stops at once, whatever
            // its raft core is busy with (installing a state, say).
            if backend.is_leader() {
                let started = Instant::now();
                let handed = rt.block_on(async {
                    tokio::time::timeout(STOP_TRANSFER_LIMIT, async {
                        loop {
                            // A full control queue (a burst of reads) is waited out.
                            match backend.step_down().await {
                                Err(keel_net::ApiError::TooManyRequests) => {
                                    tokio::time::sleep(Duration::from_millis(5)).await
                                }
                                done => return done,
                            }
                        }
                    })
                    .await
                });
                match handed {
                    Ok(Ok(())) => tracing::info!(
                        took_ms = started.elapsed().as_millis() as u64,
                        "ready to stop: leadership handed over"
                    ),
                    Ok(Err(e)) => tracing::warn!("leadership transfer failed: {e}; stopping"),
                    Err(_) => tracing::warn!("leadership transfer took too long; stopping"),
                }
            }
            // SAFETY: the default action of the signal ends the process; _exit if it did not.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
                libc::_exit(128 + sig)
            }
        })?;
    Ok(())
}

fn join_meta(cfg: &Config) -> anyhow::Result<(MemberMeta, Vec<keel_proto::keelpb::Member>)> {
    use keel_proto::prost::Message;
    let mine: Vec<String> = cfg
        .initial_cluster
        .iter()
        .filter(|(n, _)| n == &cfg.name)
        .flat_map(|(_, u)| u.clone())
        .collect();
    let others: Vec<String> = cfg
        .initial_cluster
        .iter()
        .filter(|(n, _)| n != &cfg.name)
        .flat_map(|(_, u)| u.clone())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(keel_net::peer::query(&others)).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot fetch cluster info from peer urls: could not retrieve cluster information \
                 from the given URLs ({})",
            others.join(",")
        )
    })?;
    let info = keel_proto::keelpb::ClusterInfo::decode(answer)?;
    let sorted = |u: &[String]| {
        let mut u = u.to_vec();
        u.sort();
        u
    };
    let me = info
        .members
        .iter()
        .find(|m| sorted(&m.peer_urls) == sorted(&mine))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "member {} ({}) has not been added to the cluster: run `etcdctl member add` first",
                cfg.name,
                mine.join(",")
            )
        })?;
    tracing::info!(
        member_id = format!("{:x}", me.id),
        cluster_id = format!("{:x}", info.cluster_id),
        "joining an existing cluster"
    );
    let meta = MemberMeta {
        member_id: me.id,
        cluster_id: info.cluster_id,
        voters: Vec::new(),
        name: cfg.name.clone(),
    };
    Ok((meta, info.members))
}

/// Starts the peer transport on a thread of its own, listening on `--listen-peer-urls`.
fn start_peers(
    cfg: &Config,
    meta: &MemberMeta,
    listeners: Vec<std::net::TcpListener>,
    inbound: Arc<cluster::PeerInbound>,
) -> anyhow::Result<Arc<keel_net::peer::Peers>> {
    let (htx, hrx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("keel-peer".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime for the peer transport");
            let _ = htx.send(rt.handle().clone());
            rt.block_on(std::future::pending::<()>());
        })?;
    let handle = hrx.recv().context("start the peer transport")?;
    let peers =
        keel_net::peer::Peers::start(handle, meta.member_id, meta.cluster_id, listeners, inbound)?;
    tracing::info!(addrs = ?cfg.listen_peer, "listening for peers");
    Ok(peers)
}

/// Publishes this member's name and client URLs through raft (etcd's publish), retrying
/// until it applies (etcd tells systemd it is ready only after).
fn publish_attributes(backend: &NodeBackend) {
    use keel_proto::prost::Message;
    let attrs = keel_proto::keelpb::MemberAttributes {
        member_id: backend.member_id,
        name: backend.cfg.name.clone(),
        client_urls: backend.cfg.advertise_client_urls.clone(),
    };
    let data = keel_proto::keelpb::InternalRequest {
        member_attributes: Some(attrs),
        ..Default::default()
    }
    .encode_to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime for publishing");
    loop {
        if backend.status.leader_id.load(Ordering::Acquire) != 0 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let proposal = raft_core::Proposal {
                data: data.clone(),
                tx,
            };
            if backend.proposals.send(proposal).is_err() {
                return;
            }
            let done =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), rx).await });
            if let Ok(Ok(Ok(_))) = done {
                tracing::info!(
                    name = %backend.cfg.name,
                    client_urls = ?backend.cfg.advertise_client_urls,
                    "published local member to cluster through raft"
                );
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Proposes compactions as `--auto-compaction-*` says, while this member leads.
fn auto_compact(mode: autocompact::Mode, backend: Arc<NodeBackend>) {
    use keel_net::{ApiError, Backend, WriteRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime for auto-compaction");
    let mut c = autocompact::AutoCompactor::new(mode, Instant::now());
    tracing::info!(?mode, "auto-compaction enabled");
    loop {
        std::thread::sleep(c.tick());
        if backend.status.leader_id.load(Ordering::Acquire) != backend.member_id {
            continue;
        }
        let Some(rev) = c.step(Instant::now(), backend.mvcc.current_rev()) else {
            continue;
        };
        tracing::info!(revision = rev, "starting auto-compaction");
        let req = keel_proto::pb::CompactionRequest {
            revision: rev,
            physical: false,
        };
        match rt.block_on(backend.write(WriteRequest::Compact(req))) {
            Ok(_) | Err(ApiError::Compacted) => {
                c.compacted(Instant::now(), rev);
                tracing::info!(revision = rev, "completed auto-compaction");
            }
            Err(e) => tracing::warn!(revision = rev, error = %e, "auto-compaction failed"),
        }
    }
}

/// Tells systemd the node serves (`Type=notify` units, as in etcd's deployment guides): etcd
/// sends READY=1 once it is ready to serve clients, and a unit waiting for it would otherwise
/// be killed at its start timeout. Nothing happens outside systemd (no NOTIFY_SOCKET).
fn notify_systemd() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
    match sent {
        Ok(_) => tracing::info!("notified systemd: READY=1"),
        Err(e) => tracing::warn!(error = %e, "failed to notify systemd"),
    }
}

/// Hands what the calling thread's heap holds free back to the OS now (mimalloc otherwise
/// purges it only when the thread allocates again).
pub fn return_freed_memory() {
    // SAFETY: mi_collect only releases memory mimalloc holds free.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Hands the memory this thread's heap holds free back to the OS once the core goes idle (no
/// request for a 25 ms tick). mimalloc purges freed pages only when the thread allocates
/// again, so the buffers of connections that went away stayed in RSS while the core idled
/// (~24 MiB after 100 connections). Not while busy: a forced collect ten times a second cost
/// a fifth of the put rate.
async fn release_freed_memory() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut collected) = (backend::requests_served(), true);
    loop {
        tick.tick().await;
        let now = backend::requests_served();
        if now != last {
            (last, collected) = (now, false);
        } else if !collected {
            return_freed_memory();
            collected = true;
        }
    }
}

fn net_core(
    pin: Option<core_affinity::CoreId>,
    listeners: Vec<std::net::TcpListener>,
    backend: Arc<NodeBackend>,
) {
    if let Some(id) = pin {
        core_affinity::set_for_current(id);
    }
    let status = backend.status.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(move || raft_core::spin_for_answer(&status.multi))
        .build()
        .expect("tokio runtime for a net core");
    rt.block_on(async move {
        tokio::spawn(release_freed_memory());
        let mut tasks = Vec::new();
        for l in listeners {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = keel_net::serve::serve(l, b, std::future::pending()).await {
                    fatal(FATAL_EXIT_CODE, &format!("client listener failed: {e}"));
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
