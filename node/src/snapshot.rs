//! etcd-format snapshots: what Maintenance.Snapshot streams, and the offline commands
//! `keel snapshot status|restore|export` (etcdctl's `snapshot status|restore`, with its flags,
//! messages and output) and `keel migrate` (from a stopped etcd member's data dir).
//!
//! A snapshot file is an etcd backend file (bbolt, see `keel_storage::bolt`) followed by the
//! sha256 of its bytes, as etcd streams it. A restore builds a new member's data dir beside
//! the one named and renames it into place only once it is whole, so a bad file never leaves
//! a half-restored member behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_proto::keelpb;
use keel_storage::bolt::{self, BoltFile};
use keel_storage::etcdfmt;
use keel_storage::raftlog::{MemberMeta, RaftLog};
use keel_storage::wal::WalOptions;
use sha2::{Digest, Sha256};

/// etcd streams a snapshot in pieces of this size.
pub const SEND_CHUNK_BYTES: usize = 32 * 1024;
const SHA_BYTES: usize = 32;

#[derive(Parser, Debug)]
#[command(
    name = "keel snapshot",
    about = "etcd-format snapshots (etcdctl snapshot's commands)"
)]
struct SnapshotCli {
    #[command(subcommand)]
    cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Gets backend snapshot status of a given file.
    Status {
        file: PathBuf,
        /// set the output format (fields, json, simple, table).
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Restores an etcd member snapshot to a Keel data directory.
    Restore(RestoreFlags),
    /// Writes a stopped member's state as an etcd snapshot file (etcdctl snapshot restore
    /// and etcd take it).
    Export {
        file: PathBuf,
        /// The stopped member's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RestoreFlags {
    file: PathBuf,
    #[command(flatten)]
    target: TargetFlags,
    /// Ignore snapshot integrity hash value (required if copied from data directory).
    #[arg(long)]
    skip_hash_check: bool,
    /// How much to increase the latest revision after restore.
    #[arg(long, default_value_t = 0)]
    bump_revision: u64,
    /// Mark the latest revision after restore as the point of scheduled compaction (required
    /// if --bump-revision > 0).
    #[arg(long)]
    mark_compacted: bool,
}

#[derive(Parser, Debug)]
#[command(
    name = "keel migrate",
    about = "Makes a Keel data directory from a stopped etcd member's (member/snap/db and its \
             WAL), keeping every key, revision and lease; the new member starts a new cluster \
             as `snapshot restore` does"
)]
struct MigrateFlags {
    /// The stopped etcd member's data directory.
    #[arg(long)]
    etcd_data_dir: PathBuf,
    /// The etcd member's WAL directory (default: its data dir's member/wal).
    #[arg(long)]
    etcd_wal_dir: Option<PathBuf>,
    #[command(flatten)]
    target: TargetFlags,
}

/// The new member a restore or migration creates (etcdctl snapshot restore's flags).
#[derive(clap::Args, Debug)]
struct TargetFlags {
    /// Path to the data directory (default: ${name}.keel).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Path to the WAL directory (default: the data directory's member/wal).
    #[arg(long)]
    wal_dir: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Initial cluster configuration for restore bootstrap.
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    /// Initial cluster token for the cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
}

/// Runs `keel snapshot ...` (`args` from the subcommand on).
pub fn snapshot_main(args: Vec<String>) -> ExitCode {
    let cli = match SnapshotCli::try_parse_from(crate::config::normalize_args(args)) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.cmd {
        SnapshotCmd::Status { file, write_out } => status(&file, &write_out),
        SnapshotCmd::Restore(f) => restore(f),
        SnapshotCmd::Export { file, data_dir } => export_offline(&data_dir, &file),
    };
    finish(result)
}

/// Runs `keel migrate ...`.
pub fn migrate_main(args: Vec<String>) -> ExitCode {
    let flags = match MigrateFlags::try_parse_from(crate::config::normalize_args(args)) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    finish(crate::migrate::migrate(
        &flags.etcd_data_dir,
        flags.etcd_wal_dir.as_deref(),
        flags.target.into_target(),
    ))
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One log line as etcdctl's (zap JSON): level, ts, msg, then the fields in order.
pub fn log(msg: &str, fields: &[(&str, serde_json::Value)]) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut line = format!(
        r#"{{"level":"info","ts":{ts},"msg":{}"#,
        serde_json::Value::from(msg)
    );
    for (k, v) in fields {
        line.push_str(&format!(",{}:{v}", serde_json::Value::from(*k)));
    }
    line.push('}');
    eprintln!("{line}");
}

/// An I/O error as Go prints it ("stat FILE: no such file or directory").
fn go_io(op: &str, path: &Path, e: std::io::Error) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    anyhow::anyhow!("{op} {}: {why}", path.display())
}

/// A file's bytes through a read-only map, an error as Go prints it.
pub fn map_file(path: &Path) -> anyhow::Result<keel_storage::mapped::Mapped> {
    keel_storage::mapped::Mapped::open(path).map_err(|e| go_io("stat", path, e))
}

/// Go's %v of a byte slice: `[1 2 3]`.
fn go_bytes(b: &[u8]) -> String {
    let parts: Vec<String> = b.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(" "))
}

/// The database part of a snapshot file, its sha256 checked (etcd's rule: a file whose size
/// is 32 past a multiple of 512 ends with one).
pub fn checked_db(data: &[u8], skip_hash_check: bool) -> anyhow::Result<&[u8]> {
    let has_hash = data.len() % 512 == SHA_BYTES;
    if !has_hash {
        if !skip_hash_check {
            anyhow::bail!("snapshot missing hash but --skip-hash-check=false");
        }
        return Ok(data);
    }
    let (db, sha) = data.split_at(data.len() - SHA_BYTES);
    if !skip_hash_check {
        let got = Sha256::digest(db);
        if got.as_slice() != sha {
            anyhow::bail!("expected sha256 {}, got {}", go_bytes(sha), go_bytes(&got));
        }
    }
    Ok(db)
}

/// Go's humanize.Bytes (SI units), as etcdctl prints sizes.
pub fn human_bytes(n: u64) -> String {
    if n < 10 {
        return format!("{n} B");
    }
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let val = ((n as f64 / 1000f64.powi(e as i32)) * 10.0 + 0.5).floor() / 10.0;
    if val < 10.0 {
        format!("{val:.1} {}", UNITS[e])
    } else {
        format!("{val:.0} {}", UNITS[e])
    }
}

fn status(path: &Path, write_out: &str) -> anyhow::Result<()> {
    let file = map_file(path)?;
    let db = BoltFile::open(&file)
        .and_then(|f| bolt::status(&f))
        .map_err(|e| anyhow::anyhow!("snapshot file integrity check failed: {e}"))?;
    let hash = format!("{:x}", db.hash);
    let size = human_bytes(db.total_size);
    match write_out {
        "json" => println!(
            "{}",
            serde_json::json!({
                "hash": db.hash,
                "revision": db.revision,
                "totalKey": db.total_key,
                "totalSize": db.total_size,
            })
        ),
        "table" => print!(
            "{}",
            table(
                &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
                &[
                    hash,
                    db.revision.to_string(),
                    db.total_key.to_string(),
                    size
                ],
            )
        ),
        "simple" => println!("{hash}, {}, {}, {size}", db.revision, db.total_key),
        "fields" => print!(
            "\"Hash\" : {}\n\"Revision\" : {}\n\"Keys\" : {}\n\"Size\" : {}\n",
            db.hash, db.revision, db.total_key, db.total_size
        ),
        "protobuf" => anyhow::bail!("protobuf not supported as output format"),
        _ => anyhow::bail!("unsupported output format"),
    }
    Ok(())
}

/// etcdctl's table (tablewriter: centred headers, right-aligned cells).
fn table(headers: &[&str], row: &[String]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .zip(row)
        .map(|(h, c)| h.len().max(c.len()))
        .collect();
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = rule.clone();
    for (h, w) in headers.iter().zip(&widths) {
        let left = (w - h.len()) / 2;
        out += &format!(
            "| {}{}{} ",
            " ".repeat(left),
            h,
            " ".repeat(w - h.len() - left)
        );
    }
    out += "|\n";
    out += &rule;
    for (c, w) in row.iter().zip(&widths) {
        out += &format!("| {c:>w$} ");
    }
    out += "|\n";
    out += &rule;
    out
}

/// Who the new member is and where it goes.
pub struct Target {
    pub data_dir: PathBuf,
    pub wal_dir: Option<PathBuf>,
    pub name: String,
    pub initial_cluster: String,
    pub token: String,
    pub advertise_peer_urls: String,
}

impl TargetFlags {
    fn into_target(self) -> Target {
        Target {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!("{}.keel", self.name))),
            wal_dir: self.wal_dir,
            name: self.name,
            initial_cluster: self.initial_cluster,
            token: self.initial_cluster_token,
            advertise_peer_urls: self.initial_advertise_peer_urls,
        }
    }
}

impl Target {
    fn wal_dir_for(&self, data_dir: &Path) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("member").join("wal"))
    }

    /// The new cluster's members and this member's meta, from the flags (etcd's checks).
    fn cluster(&self) -> anyhow::Result<(Vec<keelpb::Member>, MemberMeta)> {
        let advertised = crate::config::split_urls(&self.advertise_peer_urls);
        let initial =
            crate::config::initial_cluster(&self.name, &self.initial_cluster, &advertised)?;
        Ok(crate::cluster::bootstrap(&initial, &self.token, &self.name))
    }

    /// etcd's refusal to restore over anything.
    fn check_free(&self) -> anyhow::Result<()> {
        if self.data_dir.exists() {
            anyhow::bail!("data-dir {:?} exists", self.data_dir.display().to_string());
        }
        if let Some(w) = self.wal_dir.as_ref().filter(|w| w.exists()) {
            anyhow::bail!("wal-dir {:?} exists", w.display().to_string());
        }
        Ok(())
    }

    /// Builds the member's data dir: `fill` writes the backend file at the path it is given
    /// (as of raft entry 1, term 1, with the membership bytes it is given); then the WAL is
    /// created with the member's meta. All of it happens in a directory beside the data dir,
    /// renamed into place at the end (removed on failure).
    pub fn create(
        &self,
        what: &str,
        source: &Path,
        fill: impl FnOnce(&Path, Vec<u8>) -> anyhow::Result<etcdfmt::Imported>,
    ) -> anyhow::Result<etcdfmt::Imported> {
        self.check_free()?;
        let (members, meta) = self.cluster()?;
        let wal_dir = self.wal_dir_for(&self.data_dir);
        log(
            &format!("restoring {what}"),
            &[
                ("path", source.display().to_string().into()),
                ("wal-dir", wal_dir.display().to_string().into()),
                ("data-dir", self.data_dir.display().to_string().into()),
                (
                    "snap-dir",
                    self.data_dir
                        .join("member")
                        .join("snap")
                        .display()
                        .to_string()
                        .into(),
                ),
            ],
        );
        let mut part = self.data_dir.clone().into_os_string();
        part.push(".keel-restore");
        let part = PathBuf::from(part);
        let _ = std::fs::remove_dir_all(&part);
        let built = (|| -> anyhow::Result<etcdfmt::Imported> {
            let snap_dir = part.join("member").join("snap");
            std::fs::create_dir_all(&snap_dir)
                .with_context(|| format!("create {}", snap_dir.display()))?;
            let imported = fill(
                &snap_dir.join("keel.db"),
                crate::cluster::Membership::encode(&members, &[]),
            )?;
            // The WAL goes inside the staged dir unless it has a place of its own.
            let staged_wal = match &self.wal_dir {
                Some(w) => w.clone(),
                None => part.join("member").join("wal"),
            };
            let (log, _) = RaftLog::open(&staged_wal, WalOptions::default(), meta.clone(), (1, 1))
                .context("create wal")?;
            drop(log);
            sync_dir(&snap_dir)?;
            Ok(imported)
        })();
        let imported = match built {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&part);
                if let Some(w) = &self.wal_dir {
                    let _ = std::fs::remove_dir_all(w);
                }
                return Err(e);
            }
        };
        std::fs::rename(&part, &self.data_dir)
            .with_context(|| format!("rename {} to {}", part.display(), self.data_dir.display()))?;
        if let Some(parent) = self.data_dir.parent() {
            let _ = sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            });
        }
        for m in &members {
            log(
                "added member",
                &[
                    ("cluster-id", format!("{:x}", meta.cluster_id).into()),
                    ("local-member-id", "0".into()),
                    ("added-peer-id", format!("{:x}", m.id).into()),
                    ("added-peer-peer-urls", serde_json::json!(m.peer_urls)),
                ],
            );
        }
        log(
            &format!("restored {what}"),
            &[
                ("path", source.display().to_string().into()),
                ("wal-dir", wal_dir.display().to_string().into()),
                ("data-dir", self.data_dir.display().to_string().into()),
                ("revision", imported.revision.into()),
                ("compact-revision", imported.compact_rev.into()),
            ],
        );
        Ok(imported)
    }
}

pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync {}", dir.display()))
}

fn restore(f: RestoreFlags) -> anyhow::Result<()> {
    let target = f.target.into_target();
    if f.bump_revision > 0 && !f.mark_compacted {
        anyhow::bail!("--mark-compacted required if --bump-revision > 0");
    }
    let adjust = etcdfmt::Adjust {
        bump_revision: f.bump_revision.min(i64::MAX as u64 / 2) as i64,
        mark_compacted: f.mark_compacted,
    };
    let file = map_file(&f.file)?;
    // etcd's order: the data dir, then the file.
    target.check_free()?;
    let db = checked_db(&file, f.skip_hash_check)?;
    let bolt = BoltFile::open(db)
        .map_err(|e| anyhow::anyhow!("invalid snapshot {}: {e}", f.file.display()))?;
    target.create("snapshot", &f.file, |path, members| {
        etcdfmt::import(&bolt, path, (1, 1), Some(members), adjust)
            .map_err(|e| anyhow::anyhow!("invalid snapshot {}: {e}", f.file.display()))
    })?;
    Ok(())
}

/// Writes a snapshot file (database + sha256) of a stopped member's data dir.
fn export_offline(data_dir: &Path, file: &Path) -> anyhow::Result<()> {
    let db_path = data_dir.join("member").join("snap").join("keel.db");
    if !db_path.exists() {
        anyhow::bail!("no Keel backend at {}", db_path.display());
    }
    // The member must be stopped, and stay so while this reads its backend: its lock, held
    // until the end.
    let lock = crate::lock_data_dir(data_dir)
        .context("a running member is saved with `etcdctl snapshot save`")?;
    let store = keel_storage::store::Store::open(&db_path, Default::default())
        .with_context(|| format!("open backend {}", db_path.display()))?;
    let (members, removed) = match store.members() {
        Some(b) => crate::cluster::Membership::decode_with_removed(b)?,
        None => (Vec::new(), Vec::new()),
    };
    let snap = store
        .mvcc()
        .backend()
        .expect("a store reads its backend")
        .snapshot();
    let layout = etcdfmt::plan_export(&snap, &members, &removed)?;
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let out = std::fs::File::create(&part).with_context(|| format!("create {}", part.display()))?;
    let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, out));
    w = etcdfmt::write_export(&snap, &members, &removed, layout, w)?;
    let (buf, sha) = w.finish();
    let mut out = buf.into_inner().map_err(|e| e.into_error())?;
    out.write_all(&sha)?;
    out.sync_all()?;
    std::fs::rename(&part, file).with_context(|| format!("rename to {}", file.display()))?;
    log(
        "saved",
        &[
            ("path", file.display().to_string().into()),
            ("size", human_bytes(layout.size()).into()),
        ],
    );
    println!("Snapshot saved at {}", file.display());
    drop(lock);
    Ok(())
}

/// Serves Maintenance.Snapshot (on a thread of its own): waits until the backend holds
/// everything applied when the call came (`applied`), pins that state, plans the file, then
/// streams it in etcd's 32 KiB pieces with the bytes still to come, and last its sha256.
/// Memory stays at a few pieces (the channel is bounded) however large the state.
pub fn serve(
    store: keel_storage::store::StoreHandle,
    applied: u64,
    members: std::sync::Arc<Vec<keelpb::Member>>,
    removed: std::sync::Arc<Vec<u64>>,
    tx: tokio::sync::mpsc::Sender<Result<keel_proto::pb::SnapshotResponse, keel_net::ApiError>>,
) {
    let internal = |e: String| keel_net::ApiError::Internal(e);
    let result = (|| -> Result<(), keel_net::ApiError> {
        let snap = store.pinned(applied).map_err(crate::apply::storage_err)?;
        let layout =
            etcdfmt::plan_export(&snap, &members, &removed).map_err(|e| internal(e.to_string()))?;
        let total = layout.size();
        tracing::info!(size = total, "sending database snapshot to client");
        let sender = HashingWriter::new(ChunkSender {
            tx: tx.clone(),
            buf: Vec::with_capacity(SEND_CHUNK_BYTES),
            total,
            sent: 0,
        });
        match etcdfmt::write_export(&snap, &members, &removed, layout, sender) {
            Ok(sender) => {
                let (sender, sha) = sender.finish();
                sender.finish(sha)
            }
            // The client went away: nothing to tell it.
            Err(bolt::BoltError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(internal(e.to_string())),
        }
    })();
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(e));
    }
}

/// Cuts what it is given into snapshot responses (the sha256 is kept by the `HashingWriter`
/// around it).
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Result<keel_proto::pb::SnapshotResponse, keel_net::ApiError>>,
    buf: Vec<u8>,
    total: u64,
    sent: u64,
}

impl ChunkSender {
    fn send(&mut self, blob: Vec<u8>, remaining: u64) -> std::io::Result<()> {
        let resp = keel_proto::pb::SnapshotResponse {
            // As etcd's: no header on any piece, the server's version on every one.
            header: None,
            remaining_bytes: remaining,
            blob: blob.into(),
            version: crate::config::ETCD_API_VERSION.to_string(),
        };
        self.tx
            .blocking_send(Ok(resp))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }

    fn piece(&mut self) -> std::io::Result<()> {
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(SEND_CHUNK_BYTES));
        self.sent += blob.len() as u64;
        self.send(blob, self.total - self.sent)
    }

    /// The last piece, then the sha256 of everything sent.
    fn finish(mut self, sha: [u8; 32]) -> Result<(), keel_net::ApiError> {
        let gone = |_| keel_net::ApiError::Internal("client gone".into());
        if !self.buf.is_empty() {
            self.piece().map_err(gone)?;
        }
        self.send(sha.to_vec(), 0).map_err(gone)
    }
}

impl Write for ChunkSender {
    fn write(&mut self, mut b: &[u8]) -> std::io::Result<usize> {
        let n = b.len();
        while !b.is_empty() {
            let take = (SEND_CHUNK_BYTES - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..take]);
            b = &b[take..];
            if self.buf.len() == SEND_CHUNK_BYTES {
                self.piece()?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Passes bytes through, keeping their sha256.
pub struct HashingWriter<W: Write> {
    inner: W,
    sha: Sha256,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            sha: Sha256::new(),
        }
    }

    pub fn finish(self) -> (W, [u8; 32]) {
        (self.inner, self.sha.finalize().into())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_etcdctl_prints_them() {
        assert_eq!(human_bytes(20480), "20 kB");
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(1_073_741_824), "1.1 GB");
    }

    #[test]
    fn the_table_is_etcdctls() {
        assert_eq!(
            table(
                &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
                &["f3ae8ee4".into(), "7".into(), "13".into(), "20 kB".into()]
            ),
            "+----------+----------+------------+------------+\n\
             |   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n\
             +----------+----------+------------+------------+\n\
             | f3ae8ee4 |        7 |         13 |      20 kB |\n\
             +----------+----------+------------+------------+\n"
        );
    }

    #[test]
    fn the_hash_trailer_is_checked() {
        let mut data = vec![7u8; 1024];
        let sha = Sha256::digest(&data);
        data.extend_from_slice(&sha);
        assert_eq!(checked_db(&data, false).unwrap().len(), 1024);
        let mut bad = data.clone();
        bad[3] ^= 1;
        let err = checked_db(&bad, false).unwrap_err().to_string();
        assert!(err.starts_with("expected sha256 ["), "{err}");
        assert_eq!(checked_db(&bad, true).unwrap().len(), 1024);
        assert_eq!(
            checked_db(&data[..1024], false).unwrap_err().to_string(),
            "snapshot missing hash but --skip-hash-check=false"
        );
        assert_eq!(checked_db(&data[..1024], true).unwrap().len(), 1024);
    }
}
