//! Configuration with etcd's names, defaults and precedence: command-line flags (Go style
//! `-flag` is accepted too), `ETCD_*` environment variables, or a YAML `--config-file` with
//! etcd's keys (when a config file is given, flags and environment are ignored, as in etcd).
//! An unknown flag or YAML key is an error that names it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Parser;

/// The etcd version Status reports, and so what clients may rely on (kube-apiserver turns on
/// consistent reads from its watch cache only for a version whose progress requests work: at
/// least 3.4.31, 3.5.13, or 3.6). Keel serves etcd 3.6's watch semantics (progress requests
/// answered once every watcher is synced), leases, lock and election, and 3.7's RangeStream;
/// README says why it is this number. The one place it is kept.
pub const ETCD_API_VERSION: &str = "3.6.0";
const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// etcd warns above this quota ("exceeds maximum recommended quota").
pub const MAX_RECOMMENDED_QUOTA_BYTES: u64 = 8 << 30;
/// etcd's DefaultSnapshotCatchUpEntries.
const DEFAULT_SNAPSHOT_CATCHUP_ENTRIES: u64 = 5000;
/// Above this etcd warns "exceeded recommended request limit" (etcdserver's
/// recommendedMaxRequestBytes), and so does Keel.
pub const RECOMMENDED_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "keel",
    about = "Keel: a drop-in etcd v3 endpoint (thread-per-core, raft, io_uring WAL).",
    disable_version_flag = true
)]
pub struct Flags {
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Path to the server configuration file (etcd's YAML keys). Flags and environment
    /// variables are ignored when it is given.
    #[arg(long, env = "ETCD_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ${name}.keel).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Path to the dedicated wal directory (default: ${data-dir}/member/wal).
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Number of committed transactions to trigger a snapshot to disk (etcd 3.6's default;
    /// 3.5 used 100000). Keel then releases the WAL segments the snapshot covers.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Number of entries kept after a snapshot for slow followers to catch up (default 5000).
    #[arg(long, env = "ETCD_SNAPSHOT_CATCHUP_ENTRIES")]
    pub snapshot_catchup_entries: Option<u64>,
    /// The same, under etcd 3.5's name (deprecated in 3.6).
    #[arg(long, env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES")]
    pub experimental_snapshot_catchup_entries: Option<u64>,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// List of URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// List of URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// List of this member's client URLs to advertise to the public.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// Initial cluster configuration for bootstrapping (default: ${name}=${peer urls}).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the etcd cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB; a
    /// negative value disables the quota).
    #[arg(
        long,
        env = "ETCD_QUOTA_BACKEND_BYTES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: i64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u64,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u64,
    /// Log level: debug, info, warn, error (as etcd's --log-level).
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Keel only: cores to use. One owns raft, the WAL and apply; the others serve clients.
    /// Default: all cores of the machine.
    #[arg(long, env = "KEEL_CORES")]
    pub cores: Option<usize>,
    /// Keel only: the leader promotes a learner to voter by itself once it has caught up
    /// (its log at least 90% of the leader's, etcd's bar for MemberPromote).
    #[arg(long, env = "KEEL_AUTO_PROMOTE_LEARNERS")]
    pub auto_promote_learners: bool,
    /// Interpret 'auto-compaction-retention' one of: periodic|revision.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto compaction retention for mvcc key value store. 0 means disable auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// BackendBatchInterval is the maximum time before commit the backend transaction
    /// (etcd's flag; a Go duration, default 100ms).
    #[arg(long, env = "ETCD_BACKEND_BATCH_INTERVAL")]
    pub backend_batch_interval: Option<String>,
    /// BackendBatchLimit is the maximum operations before commit the backend transaction
    /// (default 10000).
    #[arg(long, env = "ETCD_BACKEND_BATCH_LIMIT")]
    pub backend_batch_limit: Option<usize>,
    /// Duration of periodic watch progress notifications (etcd 3.6's name; a Go duration,
    /// default 10m).
    #[arg(long, env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL")]
    pub watch_progress_notify_interval: Option<String>,
    /// etcd 3.4/3.5's name of --watch-progress-notify-interval.
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL")]
    pub experimental_watch_progress_notify_interval: Option<String>,
    /// Enable leader to send regular checkpoints to other members to prevent reset of
    /// remaining TTL on leader change.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT",
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub experimental_enable_lease_checkpoint: bool,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long, env = "ETCD_STRICT_RECONFIG_CHECK",
          num_args = 0..=1, default_value = "true", default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub strict_reconfig_check: bool,
    /// Duration of periodic lease checkpoints (a Go duration, default 5m).
    #[arg(long, env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL")]
    pub experimental_lease_checkpoint_interval: Option<String>,
    /// Keel only: size of a WAL segment file (default 64 MiB, as etcd's; at least 64 KiB).
    #[arg(long, env = "KEEL_WAL_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub wal_segment_bytes: u64,
}

/// The resolved configuration the node runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub wal_dir: PathBuf,
    pub listen_client: Vec<SocketAddr>,
    pub listen_peer: Vec<SocketAddr>,
    pub advertise_client_urls: Vec<String>,
    /// (name, peer urls) for every initial member.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    /// The backend quota; None when disabled (a negative --quota-backend-bytes).
    pub quota_backend_bytes: Option<u64>,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub log_level: String,
    pub cores: usize,
    pub auto_promote_learners: bool,
    /// etcd's lease checkpoint interval, when checkpoints are on.
    pub lease_checkpoint: Option<std::time::Duration>,
    /// etcd's --strict-reconfig-check: refuse membership changes that risk the quorum.
    pub strict_reconfig_check: bool,
    pub wal_segment_bytes: u64,
    pub auto_compaction: Option<crate::autocompact::Mode>,
    pub backend_batch_interval: std::time::Duration,
    /// Periodic progress notifications to watchers that asked for them.
    pub watch_progress_notify_interval: std::time::Duration,
    pub backend_batch_limit: usize,
}

/// Turns Go-style single-dash long flags (`-name x`) into `--name x`.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let go_style = i > 0 && a.len() > 2 && a.starts_with('-') && !a.starts_with("--");
            if go_style {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// etcd's YAML keys Keel acts on.
const YAML_KEYS: &[&str] = &[
    "name",
    "data-dir",
    "wal-dir",
    "snapshot-count",
    "backend-batch-interval",
    "backend-batch-limit",
    "watch-progress-notify-interval",
    "experimental-watch-progress-notify-interval",
    "experimental-enable-lease-checkpoint",
    "experimental-lease-checkpoint-interval",
    "strict-reconfig-check",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "snapshot-catchup-entries",
    "experimental-snapshot-catchup-entries",
    "heartbeat-interval",
    "election-timeout",
    "quota-backend-bytes",
    "max-request-bytes",
    "max-txn-ops",
    "listen-peer-urls",
    "listen-client-urls",
    "initial-advertise-peer-urls",
    "advertise-client-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "log-level",
];

/// etcd's YAML keys that Keel accepts but that do not change its behaviour yet (each comes
/// with a later roadmap issue); a value is logged as ignored.
const YAML_KEYS_ACCEPTED: &[&str] = &[
    "max-snapshots",
    "max-wals",
    "cors",
    "discovery",
    "discovery-fallback",
    "discovery-proxy",
    "discovery-srv",
    "enable-v2",
    "enable-pprof",
    "proxy",
    "proxy-failure-wait",
    "proxy-refresh-interval",
    "proxy-dial-timeout",
    "proxy-write-timeout",
    "proxy-read-timeout",
    "client-transport-security",
    "peer-transport-security",
    "debug",
    "logger",
    "log-outputs",
    "force-new-cluster",
    "metrics",
    "listen-metrics-urls",
];

impl Flags {
    /// Applies a YAML config file over the defaults (flags and env are ignored, as etcd does).
    fn from_yaml(text: &str, path: &std::path::Path) -> anyhow::Result<Flags> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| anyhow::anyhow!("error reading config file {}: {e}", path.display()))?;
        let mut f = Flags::parse_from(["keel"]);
        let map = match doc {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => return Ok(f),
            _ => anyhow::bail!("config file {} is not a YAML mapping", path.display()),
        };
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("config file {}: non-string key", path.display()))?
                .to_string();
            let text = yaml_scalar(&v);
            let bad = |what: &str| anyhow::anyhow!("config file key {key:?}: {what}");
            let boolean = |v: Option<&str>| match v {
                Some("true") => Ok(true),
                Some("false") | None => Ok(false),
                Some(_) => Err(bad("expected true or false")),
            };
            match key.as_str() {
                "name" => f.name = text.ok_or_else(|| bad("expected a string"))?,
                "data-dir" => f.data_dir = text.map(PathBuf::from),
                "wal-dir" => f.wal_dir = text.filter(|s| !s.is_empty()).map(PathBuf::from),
                "listen-peer-urls" => f.listen_peer_urls = text.unwrap_or_default(),
                "listen-client-urls" => f.listen_client_urls = text.unwrap_or_default(),
                "initial-advertise-peer-urls" => {
                    f.initial_advertise_peer_urls = text.unwrap_or_default()
                }
                "advertise-client-urls" => f.advertise_client_urls = text.unwrap_or_default(),
                "initial-cluster" => f.initial_cluster = text.filter(|s| !s.is_empty()),
                "initial-cluster-state" => f.initial_cluster_state = text.unwrap_or_default(),
                "initial-cluster-token" => f.initial_cluster_token = text.unwrap_or_default(),
                "log-level" => f.log_level = text.unwrap_or_default(),
                "auto-compaction-mode" => f.auto_compaction_mode = text.unwrap_or_default(),
                "backend-batch-interval" => f.backend_batch_interval = text,
                "watch-progress-notify-interval" => f.watch_progress_notify_interval = text,
                "experimental-watch-progress-notify-interval" => {
                    f.experimental_watch_progress_notify_interval = text
                }
                "experimental-lease-checkpoint-interval" => {
                    f.experimental_lease_checkpoint_interval = text
                }
                "experimental-enable-lease-checkpoint" => {
                    f.experimental_enable_lease_checkpoint = boolean(text.as_deref())?
                }
                "strict-reconfig-check" => f.strict_reconfig_check = boolean(text.as_deref())?,
                "backend-batch-limit" => {
                    f.backend_batch_limit = Some(
                        text.as_deref()
                            .unwrap_or("")
                            .parse()
                            .map_err(|_| bad("expected a non-negative integer"))?,
                    )
                }
                "auto-compaction-retention" => {
                    f.auto_compaction_retention = text.unwrap_or_default()
                }
                "quota-backend-bytes" => {
                    f.quota_backend_bytes = text
                        .as_deref()
                        .unwrap_or("")
                        .parse()
                        .map_err(|_| bad("expected an integer"))?;
                }
                "snapshot-count"
                | "snapshot-catchup-entries"
                | "experimental-snapshot-catchup-entries"
                | "heartbeat-interval"
                | "election-timeout"
                | "max-request-bytes"
                | "max-txn-ops" => {
                    let n: u64 = text
                        .as_deref()
                        .unwrap_or("")
                        .parse()
                        .map_err(|_| bad("expected a non-negative integer"))?;
                    match key.as_str() {
                        "snapshot-count" => f.snapshot_count = n,
                        "snapshot-catchup-entries" => f.snapshot_catchup_entries = Some(n),
                        "experimental-snapshot-catchup-entries" => {
                            f.experimental_snapshot_catchup_entries = Some(n)
                        }
                        "heartbeat-interval" => f.heartbeat_interval = n,
                        "election-timeout" => f.election_timeout = n,
                        "max-request-bytes" => f.max_request_bytes = n,
                        _ => f.max_txn_ops = n,
                    }
                }
                k if YAML_KEYS_ACCEPTED.contains(&k) => {
                    tracing::warn!(key = k, "config file key accepted but not supported yet");
                }
                k => {
                    debug_assert!(!YAML_KEYS.contains(&k));
                    anyhow::bail!("unknown config file key {k:?} in {}", path.display())
                }
            }
        }
        Ok(f)
    }
}

fn yaml_scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Resolves an `http://host:port` listen URL to a socket address.
pub fn listen_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        anyhow::bail!("{url}: TLS listeners are not supported yet (security issue)")
    } else {
        anyhow::bail!("{url}: expected a URL like http://127.0.0.1:2379")
    };
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("{url}: missing port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("{url}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url}: no address"))
}

impl Config {
    /// The backend file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("member").join("snap").join("keel.db")
    }

    /// Parses argv (and the environment), then the config file if one is named.
    pub fn load(args: Vec<String>) -> anyhow::Result<Option<Config>> {
        let flags = Flags::try_parse_from(normalize_args(args))?;
        if flags.version {
            return Ok(None);
        }
        let flags = match &flags.config_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
                Flags::from_yaml(&text, p)?
            }
            None => flags,
        };
        Config::from_flags(flags).map(Some)
    }

    pub fn from_flags(f: Flags) -> anyhow::Result<Config> {
        let data_dir = f
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.keel", f.name)));
        let wal_dir = f
            .wal_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("member").join("wal"));
        let listen_client = split_urls(&f.listen_client_urls)
            .iter()
            .map(|u| listen_addr(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if listen_client.is_empty() {
            anyhow::bail!("--listen-client-urls must name at least one URL");
        }
        let peer_urls = split_urls(&f.initial_advertise_peer_urls);
        let initial_cluster_text = f
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={}", f.name, peer_urls.join(&format!(",{}=", f.name))));
        let initial_cluster = initial_cluster(&f.name, &initial_cluster_text, &peer_urls)?;
        let listen_peer = split_urls(&f.listen_peer_urls)
            .iter()
            .map(|u| listen_addr(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        match f.initial_cluster_state.as_str() {
            "new" | "existing" => {}
            s => anyhow::bail!("invalid value {s:?} for --initial-cluster-state"),
        }
        if f.heartbeat_interval == 0 || f.election_timeout < 5 * f.heartbeat_interval {
            anyhow::bail!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                f.election_timeout,
                f.heartbeat_interval
            );
        }
        if f.max_request_bytes as usize > crate::raft_core::REQUEST_BYTES_LIMIT {
            anyhow::bail!(
                "--max-request-bytes {} is larger than one WAL record can carry: at most {} \
                 (etcd recommends at most {})",
                f.max_request_bytes,
                crate::raft_core::REQUEST_BYTES_LIMIT,
                RECOMMENDED_MAX_REQUEST_BYTES
            );
        }
        if f.wal_segment_bytes < 64 << 10 || !f.wal_segment_bytes.is_multiple_of(4096) {
            anyhow::bail!(
                "--wal-segment-bytes {} must be a multiple of 4096 of at least 65536",
                f.wal_segment_bytes
            );
        }
        let cores = f.cores.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        Ok(Config {
            name: f.name,
            data_dir,
            wal_dir,
            listen_client,
            listen_peer,
            advertise_client_urls: split_urls(&f.advertise_client_urls),
            initial_cluster,
            initial_cluster_state: f.initial_cluster_state,
            initial_cluster_token: f.initial_cluster_token,
            heartbeat_ms: f.heartbeat_interval,
            election_ms: f.election_timeout,
            snapshot_count: f.snapshot_count,
            snapshot_catchup_entries: f
                .snapshot_catchup_entries
                .or(f.experimental_snapshot_catchup_entries)
                .unwrap_or(DEFAULT_SNAPSHOT_CATCHUP_ENTRIES),
            quota_backend_bytes: match f.quota_backend_bytes {
                0 => Some(DEFAULT_QUOTA_BYTES),
                q if q < 0 => None,
                q => Some(q as u64),
            },
            max_request_bytes: f.max_request_bytes as usize,
            max_txn_ops: f.max_txn_ops as usize,
            log_level: f.log_level,
            cores: cores.max(1),
            auto_promote_learners: f.auto_promote_learners,
            strict_reconfig_check: f.strict_reconfig_check,
            lease_checkpoint: match (
                f.experimental_enable_lease_checkpoint,
                &f.experimental_lease_checkpoint_interval,
            ) {
                (false, _) => None,
                (true, None) => Some(std::time::Duration::from_secs(300)),
                (true, Some(d)) => Some(
                    crate::autocompact::parse_go_duration(d)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "invalid --experimental-lease-checkpoint-interval {d:?}"
                            )
                        })?,
                ),
            },
            wal_segment_bytes: f.wal_segment_bytes,
            backend_batch_interval: match &f.backend_batch_interval {
                None => std::time::Duration::from_millis(100),
                Some(d) => crate::autocompact::parse_go_duration(d)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| anyhow::anyhow!("invalid --backend-batch-interval {d:?}"))?,
            },
            backend_batch_limit: f.backend_batch_limit.unwrap_or(10_000).max(1),
            watch_progress_notify_interval: match f
                .watch_progress_notify_interval
                .as_ref()
                .or(f.experimental_watch_progress_notify_interval.as_ref())
            {
                None => std::time::Duration::from_secs(600),
                Some(d) => crate::autocompact::parse_go_duration(d)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        anyhow::anyhow!("invalid --watch-progress-notify-interval {d:?}")
                    })?,
            },
            auto_compaction: crate::autocompact::parse(
                &f.auto_compaction_mode,
                &f.auto_compaction_retention,
            )?,
        })
    }
}

/// `--initial-cluster` parsed, with etcd's checks that it names this member (`name`) and that
/// its entry lists exactly the peer URLs the member advertises.
pub fn initial_cluster(
    name: &str,
    text: &str,
    advertised: &[String],
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let initial_cluster = parse_initial_cluster(text)?;
    if !initial_cluster.iter().any(|(n, _)| n == name) {
        anyhow::bail!("couldn't find local name {name:?} in the initial cluster configuration");
    }
    let listed: Vec<String> = initial_cluster
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, u)| u.iter().cloned())
        .collect();
    let (mut a, mut b) = (listed.clone(), advertised.to_vec());
    a.sort();
    b.sort();
    if a != b {
        anyhow::bail!(
            "--initial-cluster has {name}={} but missing from --initial-advertise-peer-urls={}",
            listed.join(","),
            advertised.join(",")
        );
    }
    Ok(initial_cluster)
}

/// Parses `name1=url1,name1=url2,name2=url3` into members in order of first appearance.
pub fn parse_initial_cluster(s: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for part in split_urls(s) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--initial-cluster: {part:?} is not name=url"))?;
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => out.push((name.to_string(), vec![url.to_string()])),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> anyhow::Result<Config> {
        let mut v = vec!["keel".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        Config::load(v).map(|c| c.expect("not --version"))
    }

    #[test]
    fn go_style_boolean_flags_take_a_value_or_none() {
        let c = load(&[]).unwrap();
        assert!(c.strict_reconfig_check && c.lease_checkpoint.is_none());
        let c = load(&["--strict-reconfig-check=false"]).unwrap();
        assert!(!c.strict_reconfig_check);
        let c = load(&["--experimental-enable-lease-checkpoint=true"]).unwrap();
        assert_eq!(
            c.lease_checkpoint,
            Some(std::time::Duration::from_secs(300))
        );
        let c = load(&[
            "--experimental-enable-lease-checkpoint",
            "--experimental-lease-checkpoint-interval",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.lease_checkpoint, Some(std::time::Duration::from_secs(2)));
        let p = std::path::Path::new("keel.yaml");
        let yaml = "strict-reconfig-check: false\nexperimental-enable-lease-checkpoint: true\n";
        let c = Config::from_flags(Flags::from_yaml(yaml, p).unwrap()).unwrap();
        assert!(!c.strict_reconfig_check && c.lease_checkpoint.is_some());
        let err = Flags::from_yaml("strict-reconfig-check: maybe\n", p)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("expected true or false"), "{err}");
    }

    #[test]
    fn max_request_bytes_is_refused_above_what_one_wal_record_carries() {
        let limit = crate::raft_core::REQUEST_BYTES_LIMIT;
        let at_limit = load(&["--max-request-bytes", &limit.to_string()]).unwrap();
        assert_eq!(at_limit.max_request_bytes, limit);
        let err = load(&["--max-request-bytes", &(limit + 1).to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "larger than one WAL record can carry: at most {limit}"
            )),
            "{err}"
        );
        assert!(load(&["--max-request-bytes", "300000000"]).is_err());
    }

    #[test]
    fn election_timeout_below_five_heartbeats_is_etcds_error() {
        let e = load(&["--heartbeat-interval", "100", "--election-timeout", "400"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--election-timeout[400ms] should be at least as 5 times as --heartbeat-interval[100ms]"
        );
        assert!(load(&["--heartbeat-interval", "100", "--election-timeout", "500"]).is_ok());
    }

    #[test]
    fn defaults_are_etcds_with_keel_data_dir() {
        let c = load(&[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, PathBuf::from("default.keel"));
        assert_eq!(c.wal_dir, PathBuf::from("default.keel/member/wal"));
        assert_eq!(c.listen_client, vec!["127.0.0.1:2379".parse().unwrap()]);
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.quota_backend_bytes, Some(2 << 30));
        let off = load(&["--quota-backend-bytes", "-1"]).unwrap();
        assert_eq!(
            off.quota_backend_bytes, None,
            "a negative quota disables it, as in etcd"
        );
        assert_eq!(
            c.initial_cluster,
            vec![(
                "default".to_string(),
                vec!["http://localhost:2380".to_string()]
            )]
        );
    }

    #[test]
    fn go_style_flags_and_unknown_flags() {
        let c = load(&["-name", "n1", "--max-txn-ops=7"]).unwrap();
        assert_eq!((c.name.as_str(), c.max_txn_ops), ("n1", 7));
        assert_eq!(c.data_dir, PathBuf::from("n1.keel"));
        let e = load(&["--no-such-flag", "1"]).unwrap_err().to_string();
        assert!(e.contains("--no-such-flag"), "{e}");
    }

    #[test]
    fn yaml_sample_is_accepted_and_unknown_keys_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("etcd.yml");
        std::fs::write(
            &p,
            "name: node1\ndata-dir: /var/lib/etcd\nlisten-client-urls: http://0.0.0.0:2379\n\
             advertise-client-urls: http://192.168.1.10:2379\n\
             listen-peer-urls: http://0.0.0.0:2380\n\
             initial-advertise-peer-urls: http://192.168.1.10:2380\n",
        )
        .unwrap();
        let c = load(&["--config-file", p.to_str().unwrap(), "--name", "ignored"]).unwrap();
        assert_eq!(c.name, "node1");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/etcd"));
        assert_eq!(c.listen_client, vec!["0.0.0.0:2379".parse().unwrap()]);
        assert_eq!(
            c.initial_cluster[0].1,
            vec!["http://192.168.1.10:2380".to_string()]
        );
        std::fs::write(&p, "name: x\nbogus-key: 1\n").unwrap();
        let e = load(&["--config-file", p.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus-key"), "{e}");
    }

    #[test]
    fn bad_urls_and_cluster_are_rejected() {
        assert!(load(&["--listen-client-urls", "https://127.0.0.1:1"]).is_err());
        assert!(load(&["--listen-client-urls", "127.0.0.1:1"]).is_err());
        let e = load(&["--initial-cluster", "other=http://127.0.0.1:2380"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("couldn't find local name"), "{e}");
    }
}
