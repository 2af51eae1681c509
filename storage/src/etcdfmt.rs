//! Keel's state as an etcd backend file and back: what an etcd-format snapshot holds.
//!
//! ```text
//! etcd bucket       key                                  value
//! "alarm"           etcdserverpb.AlarmMember (protobuf)  empty
//! "auth"            "authRevision", "authEnabled"        u64 BE, 1 byte
//! "authRoles"       role name                            authpb.Role
//! "authUsers"       user name                            authpb.User
//! "cluster"         "clusterVersion"                     "3.4.0" (left out here: the etcd
//!                                                        that restores decides it)
//! "key"             main u64 BE | '_' | sub u64 BE       mvccpb.KeyValue; a tombstone's key
//!                   (| 't' for a tombstone)              ends in 't' and its value holds only
//!                                                        the key
//! "lease"           lease ID u64 BE                      leasepb.Lease {ID, TTL, RemainingTTL}
//! "members"         member ID in hex                     JSON {"id","peerURLs","isLearner",
//!                                                        "name","clientURLs"}
//! "members_removed" member ID in hex                     "removed"
//! "meta"            "consistent_index", "term"           u64 BE
//!                   "confState"                          raftpb.ConfState as JSON
//!                   "scheduledCompactRev",               a revision as in "key" (17 bytes)
//!                   "finishedCompactRev"
//! ```
//!
//! Keel has no auth yet: the auth buckets of an imported file are kept verbatim in the
//! backend (`AUTH_PREFIX` + bucket + NUL + key), so they go out again in an export.

use std::io::Write;
use std::path::Path;

use keel_proto::prost::Message;
use keel_proto::{keelpb, mvccpb, pb};

use crate::backend::file::PageFile;
use crate::backend::page::KEY_BYTES_MAX;
use crate::backend::Snapshot;
use crate::bolt::{bad, BoltError, BoltFile, Layout, Writer};
use crate::mvcc::{decode_record, encode_record, record_key};
use crate::store::{
    decode_alarms, encode_alarms, lease_key, meta_i64, Alarm, LeaseRecord, LEASE_PREFIX,
    META_ALARMS, META_COMPACT_REV, META_CONSISTENT_INDEX, META_CURRENT_REV,
    META_FINISHED_COMPACT_REV, META_MEMBERS, META_TERM,
};
use crate::transfer::Filler;

/// Backend keys of the auth buckets kept from an imported file.
pub const AUTH_PREFIX: u8 = b'a';
const AUTH_BUCKETS: [&[u8]; 3] = [b"auth", b"authRoles", b"authUsers"];
/// An export drops the pages it has read from RSS every this many bytes.
const RELEASE_BYTES: usize = 8 << 20;

impl From<crate::Error> for BoltError {
    fn from(e: crate::Error) -> BoltError {
        BoltError::Bad(e.to_string())
    }
}

/// leasepb.Lease.
#[derive(Clone, PartialEq, Message)]
struct LeasePb {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// etcd's revision key: main BE | '_' | sub BE, and 't' for a tombstone.
fn rev_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&(main as u64).to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&(sub as u64).to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// (main, sub, tombstone) of an etcd revision key.
fn parse_rev_key(k: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    Some((
        u64::from_be_bytes(k[..8].try_into().ok()?) as i64,
        u64::from_be_bytes(k[9..17].try_into().ok()?) as i64,
        tombstone,
    ))
}

/// A member as etcd stores it in "members": membership.Member as JSON (Go's field order and
/// omitempty rules).
pub fn member_json(m: &keelpb::Member) -> String {
    let list = |v: &[String]| serde_json::to_string(v).expect("strings");
    let mut s = format!(r#"{{"id":{},"peerURLs":{}"#, m.id, list(&m.peer_urls));
    if m.is_learner {
        s.push_str(r#","isLearner":true"#);
    }
    if !m.name.is_empty() {
        s.push_str(&format!(
            r#","name":{}"#,
            serde_json::to_string(&m.name).expect("a string")
        ));
    }
    if !m.client_urls.is_empty() {
        s.push_str(&format!(r#","clientURLs":{}"#, list(&m.client_urls)));
    }
    s.push('}');
    s
}

/// A member from etcd's JSON (as in "members", or a membership change's context); its URLs
/// sorted, as etcd keeps them.
pub fn member_from_json(v: &[u8]) -> Option<keelpb::Member> {
    let j: serde_json::Value = serde_json::from_slice(v).ok()?;
    let list = |k: &str| -> Vec<String> {
        let mut v: Vec<String> = j[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    Some(keelpb::Member {
        id: j["id"].as_u64()?,
        name: j["name"].as_str().unwrap_or_default().to_string(),
        peer_urls: list("peerURLs"),
        client_urls: list("clientURLs"),
        is_learner: j["isLearner"].as_bool().unwrap_or(false),
    })
}

/// Plans an export of `snap` (the planning pass); its size is `layout.size()`.
pub fn plan_export<F: PageFile>(
    snap: &Snapshot<F>,
    members: &[keelpb::Member],
    removed: &[u64],
) -> Result<Layout, BoltError> {
    let mut w = Writer::plan();
    feed(snap, members, removed, &mut w)?;
    Ok(w.finish()?.0)
}

/// Writes the export planned as `layout` to `out` (exactly `layout.size()` bytes).
pub fn write_export<F: PageFile, W: Write>(
    snap: &Snapshot<F>,
    members: &[keelpb::Member],
    removed: &[u64],
    layout: Layout,
    out: W,
) -> Result<W, BoltError> {
    let mut w = Writer::write(out, layout)?;
    feed(snap, members, removed, &mut w)?;
    Ok(w.finish()?.1.expect("the writing pass has an output"))
}

/// Gives the writer every bucket of the export, in name order.
fn feed<F: PageFile, W: Write>(
    snap: &Snapshot<F>,
    members: &[keelpb::Member],
    removed: &[u64],
    w: &mut Writer<W>,
) -> Result<(), BoltError> {
    w.begin_bucket(b"alarm")?;
    let alarms = match snap.get(META_ALARMS)? {
        Some(v) => decode_alarms(v).ok_or_else(|| BoltError::Bad("bad alarms".into()))?,
        None => Vec::new(),
    };
    let mut keys: Vec<Vec<u8>> = alarms
        .iter()
        .map(|(member, alarm)| {
            pb::AlarmMember {
                member_id: *member,
                alarm: *alarm,
            }
            .encode_to_vec()
        })
        .collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        w.put(&k, b"")?;
    }
    for name in AUTH_BUCKETS {
        w.begin_bucket(name)?;
        let prefix = auth_prefix(name);
        let mut end = prefix.clone();
        *end.last_mut().expect("a prefix") += 1;
        let mut any = false;
        snap.try_range(&prefix, Some(&end), |k, v| {
            any = true;
            w.put(&k[prefix.len()..], v).map(|_| true)
        })?;
        if name == b"auth" && !any {
            // What a new etcd keeps: auth disabled, revision 1.
            w.put(b"authRevision", &1u64.to_be_bytes())?;
        }
    }
    w.begin_bucket(b"cluster")?;
    w.begin_bucket(b"key")?;
    let mut read = 0usize;
    snap.try_range(b"r", Some(b"s"), |k, v| {
        read += k.len() + v.len();
        if read >= RELEASE_BYTES {
            snap.release_map();
            read = 0;
        }
        let (Some(main), Some(sub), Some(rec)) = (
            k.get(1..9).and_then(|b| b.try_into().ok()),
            k.get(9..17).and_then(|b| b.try_into().ok()),
            decode_record(v),
        ) else {
            return bad("a record that does not decode");
        };
        let (main, sub) = (
            u64::from_be_bytes(main) as i64,
            u64::from_be_bytes(sub) as i64,
        );
        let tombstone = rec.version == 0;
        let kv = if tombstone {
            mvccpb::KeyValue {
                key: bytes::Bytes::copy_from_slice(rec.key),
                ..Default::default()
            }
        } else {
            mvccpb::KeyValue {
                key: bytes::Bytes::copy_from_slice(rec.key),
                create_revision: rec.create_rev,
                mod_revision: main,
                version: rec.version,
                value: bytes::Bytes::copy_from_slice(rec.value),
                lease: rec.lease,
            }
        };
        w.put(&rev_key(main, sub, tombstone), &kv.encode_to_vec())
            .map(|_| true)
    })?;
    w.begin_bucket(b"lease")?;
    snap.try_range(&[LEASE_PREFIX], Some(&[LEASE_PREFIX + 1]), |k, v| {
        let (Some(id), true) = (k.get(1..9), v.len() == 16) else {
            return bad("a lease that does not decode");
        };
        let lease = LeasePb {
            id: u64::from_be_bytes(id.try_into().expect("8 bytes")) as i64,
            ttl: i64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
            remaining_ttl: i64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
        };
        w.put(id, &lease.encode_to_vec()).map(|_| true)
    })?;
    w.begin_bucket(b"members")?;
    let mut entries: Vec<(String, String)> = members
        .iter()
        .map(|m| (format!("{:x}", m.id), member_json(m)))
        .collect();
    entries.sort();
    for (k, v) in entries {
        w.put(k.as_bytes(), v.as_bytes())?;
    }
    w.begin_bucket(b"members_removed")?;
    let mut gone: Vec<String> = removed.iter().map(|id| format!("{id:x}")).collect();
    gone.sort();
    for k in gone {
        w.put(k.as_bytes(), b"removed")?;
    }
    w.begin_bucket(b"meta")?;
    let index = meta_i64(snap, META_CONSISTENT_INDEX, 0)? as u64;
    let term = meta_i64(snap, META_TERM, 0)? as u64;
    let scheduled = meta_i64(snap, META_COMPACT_REV, -1)?;
    let finished = meta_i64(snap, META_FINISHED_COMPACT_REV, -1)?;
    // etcd 3.5+ keeps raft's configuration beside the index (etcd 3.6 reads it to tell a
    // 3.5 schema); Go's JSON of raftpb.ConfState.
    let ids = |learners: bool| -> String {
        let v: Vec<String> = members
            .iter()
            .filter(|m| m.is_learner == learners)
            .map(|m| m.id.to_string())
            .collect();
        if v.is_empty() {
            "null".into()
        } else {
            format!("[{}]", v.join(","))
        }
    };
    if !members.is_empty() {
        let conf = format!(
            r#"{{"voters":{},"learners":{},"voters_outgoing":null,"learners_next":null,"auto_leave":false}}"#,
            ids(false),
            ids(true)
        );
        w.put(b"confState", conf.as_bytes())?;
    }
    w.put(b"consistent_index", &index.to_be_bytes())?;
    if finished > 0 {
        w.put(b"finishedCompactRev", &rev_key(finished, 0, false))?;
    }
    if scheduled > 0 {
        w.put(b"scheduledCompactRev", &rev_key(scheduled, 0, false))?;
    }
    w.put(b"term", &term.to_be_bytes())?;
    Ok(())
}

fn auth_prefix(bucket: &[u8]) -> Vec<u8> {
    let mut p = vec![AUTH_PREFIX];
    p.extend_from_slice(bucket);
    p.push(0);
    p
}

/// What a restore changes on the way in (etcdutl's restore flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adjust {
    /// Raise the revision by this much (--bump-revision), so clients that watched the old
    /// cluster never see a revision of the restored one reused.
    pub bump_revision: i64,
    /// Make the (bumped) latest revision the compaction revision (--mark-compacted), so
    /// watchers from before the restore are told to start over.
    pub mark_compacted: bool,
}

/// What an import found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Imported {
    /// The store's revision (the last record's, or the compaction's if higher).
    pub revision: i64,
    /// The compaction revision (-1: never compacted).
    pub compact_rev: i64,
    /// Records (versions and tombstones) and leases.
    pub records: u64,
    pub leases: u64,
}

/// Writes a new Keel backend at `dest` holding the etcd backend file `file`'s state, as of
/// raft entry `applied` (index, term), with `members` (the node's encoding) as its
/// membership. etcd's membership, cluster version and consistent index are not carried over
/// (a restore starts a new cluster, as etcd's does).
pub fn import(
    file: &BoltFile<'_>,
    dest: &Path,
    applied: (u64, u64),
    members: Option<Vec<u8>>,
    adjust: Adjust,
) -> Result<Imported, BoltError> {
    if dest.exists() {
        return bad(format!("{} exists", dest.display()));
    }
    let mut fill = Filler::create(dest)?;
    let mut out = Imported {
        revision: 1,
        compact_rev: -1,
        records: 0,
        leases: 0,
    };
    let mut finished = -1;
    let mut alarms: Vec<Alarm> = Vec::new();
    for b in file.buckets()? {
        match b.name {
            b"key" => file.for_each(&b, |k, v| {
                let Some((main, sub, tombstone)) = parse_rev_key(k) else {
                    return bad(format!("\"key\" bucket: bad revision key {k:02x?}"));
                };
                if v.is_empty() {
                    // etcdutl restore --bump-revision's marker: the revision, no record.
                    out.revision = out.revision.max(main);
                    return Ok(true);
                }
                let at = || format!("\"key\" bucket: the record of revision {main}.{sub}");
                let Ok(mut kv) = mvccpb::KeyValue::decode(v) else {
                    return bad(format!("{} does not decode", at()));
                };
                if kv.key.is_empty() {
                    return bad(format!("{} has no key", at()));
                }
                if tombstone {
                    kv = mvccpb::KeyValue {
                        key: kv.key,
                        ..Default::default()
                    };
                } else if kv.mod_revision != main || kv.version < 1 || kv.create_revision < 1 {
                    return bad(format!(
                        "{} says mod_revision {}, create_revision {}, version {}",
                        at(),
                        kv.mod_revision,
                        kv.create_revision,
                        kv.version
                    ));
                }
                out.revision = out.revision.max(main);
                out.records += 1;
                fill.put(record_key(main, sub).to_vec(), encode_record(&kv))?;
                Ok(true)
            })?,
            b"lease" => file.for_each(&b, |k, v| {
                let l = LeasePb::decode(v).ok().filter(|l| {
                    k.len() == 8 && l.id == u64::from_be_bytes(k.try_into().expect("8")) as i64
                });
                let Some(l) = l else {
                    return bad(format!("\"lease\" bucket: bad lease {k:02x?}"));
                };
                let rec = LeaseRecord {
                    ttl: l.ttl,
                    remaining_ttl: l.remaining_ttl,
                };
                let mut v = Vec::with_capacity(16);
                v.extend_from_slice(&rec.ttl.to_le_bytes());
                v.extend_from_slice(&rec.remaining_ttl.to_le_bytes());
                out.leases += 1;
                fill.put(lease_key(l.id).to_vec(), v)?;
                Ok(true)
            })?,
            b"meta" => file.for_each(&b, |k, v| {
                let rev = || match parse_rev_key(v) {
                    Some((main, _, false)) => Ok(main),
                    _ => bad(format!(
                        "\"meta\" bucket: bad {}",
                        String::from_utf8_lossy(k)
                    )),
                };
                match k {
                    b"scheduledCompactRev" => out.compact_rev = out.compact_rev.max(rev()?),
                    b"finishedCompactRev" => finished = rev()?,
                    _ => {}
                }
                Ok(true)
            })?,
            b"alarm" => file.for_each(&b, |k, _| {
                let Ok(a) = pb::AlarmMember::decode(k) else {
                    return bad("\"alarm\" bucket: an alarm that does not decode");
                };
                alarms.push((a.member_id, a.alarm));
                Ok(true)
            })?,
            name if AUTH_BUCKETS.contains(&name) => {
                let prefix = auth_prefix(name);
                file.for_each(&b, |k, v| {
                    if name == b"auth" && k == b"authEnabled" && v.first() == Some(&1) {
                        return bad(
                            "auth is enabled in this etcd state, and Keel does not serve Auth \
                             yet: its users and roles would not be enforced. Disable it \
                             (etcdctl auth disable), then take a new snapshot",
                        );
                    }
                    if prefix.len() + k.len() > KEY_BYTES_MAX {
                        return bad(format!(
                            "{:?} bucket: a name of {} bytes (Keel keeps names of up to {})",
                            String::from_utf8_lossy(name),
                            k.len(),
                            KEY_BYTES_MAX - prefix.len()
                        ));
                    }
                    let mut key = prefix.clone();
                    key.extend_from_slice(k);
                    fill.put(key, v.to_vec())?;
                    Ok(true)
                })?
            }
            // members, members_removed, cluster: the new cluster's own.
            _ => {}
        }
    }
    out.compact_rev = out.compact_rev.max(finished);
    out.revision = out.revision.max(out.compact_rev) + adjust.bump_revision.max(0);
    if adjust.mark_compacted {
        // Carried out (physically) when the store opens, as a compaction a restart resumes.
        out.compact_rev = out.revision;
    }
    alarms.sort();
    alarms.dedup();
    fill.put(META_ALARMS.to_vec(), encode_alarms(&alarms))?;
    fill.put(
        META_CONSISTENT_INDEX.to_vec(),
        applied.0.to_le_bytes().to_vec(),
    )?;
    fill.put(META_TERM.to_vec(), applied.1.to_le_bytes().to_vec())?;
    fill.put(
        META_CURRENT_REV.to_vec(),
        out.revision.to_le_bytes().to_vec(),
    )?;
    fill.put(
        META_COMPACT_REV.to_vec(),
        out.compact_rev.to_le_bytes().to_vec(),
    )?;
    fill.put(
        META_FINISHED_COMPACT_REV.to_vec(),
        finished.to_le_bytes().to_vec(),
    )?;
    if let Some(m) = members {
        fill.put(META_MEMBERS.to_vec(), m)?;
    }
    fill.flush()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};
    use bytes::Bytes;

    fn members() -> Vec<keelpb::Member> {
        vec![keelpb::Member {
            id: 0x3e3d1def8903a6d0,
            name: "s1".into(),
            peer_urls: vec!["http://127.0.0.1:23800".into()],
            client_urls: vec!["http://127.0.0.1:23790".into()],
            is_learner: false,
        }]
    }

    #[test]
    fn member_json_is_etcds() {
        let json = r#"{"id":4484773718563989200,"peerURLs":["http://127.0.0.1:23800"],"name":"s1","clientURLs":["http://127.0.0.1:23790"]}"#;
        assert_eq!(member_json(&members()[0]), json);
        assert_eq!(
            member_from_json(json.as_bytes()),
            Some(members()[0].clone())
        );
        let learner = keelpb::Member {
            id: 1,
            name: String::new(),
            peer_urls: vec!["http://a:1".into()],
            client_urls: vec![],
            is_learner: true,
        };
        let json = r#"{"id":1,"peerURLs":["http://a:1"],"isLearner":true}"#;
        assert_eq!(member_json(&learner), json);
        assert_eq!(member_from_json(json.as_bytes()), Some(learner));
        assert_eq!(member_from_json(b"{}"), None, "no id");
    }

    /// A store with history, a tombstone, a compaction, a lease and an alarm; exported, then
    /// imported into a new backend: every record, the lease and the revisions come back.
    #[test]
    fn export_then_import_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("a.db"), StoreOptions::default()).unwrap();
        let put = |s: &mut Store, k: &str, v: &str, lease: i64| {
            let mut t = s.write();
            t.put(k.as_bytes(), Bytes::from(v.to_string()), lease);
            t.commit();
        };
        put(&mut store, "a", "1", 0);
        put(&mut store, "b", "2", 0);
        put(&mut store, "a", "3", 0);
        store.put_lease(
            77,
            LeaseRecord {
                ttl: 600,
                remaining_ttl: 0,
            },
        );
        put(&mut store, "c", "4", 77);
        {
            let mut t = store.write();
            t.delete_range(crate::mvcc::KeyRange::Single(b"b"));
            t.commit();
        }
        store.compact(3).unwrap();
        put(&mut store, "d", "5", 0);
        store.activate_alarm((9, 1));
        store.set_applied(12, 2);
        store.commit().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.handle().finished_compact_rev() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = store.mvcc().hash_kv(0).unwrap();
        let snap = store.mvcc().backend().unwrap().snapshot();
        let layout = plan_export(&snap, &members(), &[0x1e15ce0f058daaad]).unwrap();
        let bytes =
            write_export(&snap, &members(), &[0x1e15ce0f058daaad], layout, Vec::new()).unwrap();
        assert_eq!(bytes.len() as u64, layout.size());
        drop(snap);
        drop(store);

        let file = BoltFile::open(&bytes).unwrap();
        let st = crate::bolt::status(&file).unwrap();
        assert_eq!(st.revision, 7);
        // alarm 1, auth 1, key 6 (a@2 survives the compaction at 3), lease 1, members 1,
        // members_removed 1, meta 5.
        assert_eq!(st.total_key, 16);
        let gone = file.bucket(b"members_removed").unwrap().unwrap();
        let mut removed = Vec::new();
        file.for_each(&gone, |k, v| {
            removed.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            removed,
            [(b"1e15ce0f058daaad".to_vec(), b"removed".to_vec())]
        );
        let dest = dir.path().join("b.db");
        let got = import(&file, &dest, (1, 1), Some(b"m".to_vec()), Adjust::default()).unwrap();
        assert_eq!(
            got,
            Imported {
                revision: 7,
                compact_rev: 3,
                records: 6,
                leases: 1
            }
        );
        let store = Store::open(&dest, StoreOptions::default()).unwrap();
        assert_eq!(store.mvcc().current_rev(), 7);
        assert_eq!(store.mvcc().compact_rev(), 3);
        assert_eq!(store.mvcc().hash_kv(0).unwrap(), before);
        assert_eq!(store.applied(), (1, 1));
        assert_eq!(store.alarms(), &[(9, 1)]);
        assert_eq!(store.members(), Some(&b"m"[..]));
        assert_eq!(
            store.leases().get(&77),
            Some(&LeaseRecord {
                ttl: 600,
                remaining_ttl: 0
            })
        );
        let c = store
            .mvcc()
            .range(
                crate::mvcc::KeyRange::Single(b"c"),
                crate::mvcc::RangeOptions::default(),
            )
            .unwrap();
        assert_eq!(c.kvs[0].lease, 77);
        assert_eq!(c.kvs[0].mod_revision, 5);
    }

    #[test]
    fn bump_and_mark_compacted_raise_the_revision_and_compact_there() {
        let rev = |main: u64| rev_key(main as i64, 0, false);
        let kv = |k: &str, rev: i64| {
            mvccpb::KeyValue {
                key: bytes::Bytes::copy_from_slice(k.as_bytes()),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                value: bytes::Bytes::from_static(b"v"),
                lease: 0,
            }
            .encode_to_vec()
        };
        let bytes = crate::bolt::build_file(&vec![
            (
                b"authUsers".to_vec(),
                vec![(b"root".to_vec(), b"user record".to_vec())],
            ),
            (
                b"key".to_vec(),
                vec![(rev(2), kv("a", 2)), (rev(3), kv("b", 3))],
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.db");
        let adjust = Adjust {
            bump_revision: 1000,
            mark_compacted: true,
        };
        let got = import(
            &BoltFile::open(&bytes).unwrap(),
            &dest,
            (1, 1),
            None,
            adjust,
        )
        .unwrap();
        assert_eq!((got.revision, got.compact_rev), (1003, 1003));
        let store = Store::open(&dest, StoreOptions::default()).unwrap();
        assert_eq!(store.mvcc().current_rev(), 1003);
        assert_eq!(store.mvcc().compact_rev(), 1003);
        // The latest versions stay readable; the auth bucket goes out again as it came in.
        let r = store
            .mvcc()
            .range(
                crate::mvcc::KeyRange::Span(b"", b""),
                crate::mvcc::RangeOptions::default(),
            )
            .unwrap();
        assert_eq!(r.kvs.len(), 2);
        let snap = store.mvcc().backend().unwrap().snapshot();
        let layout = plan_export(&snap, &[], &[]).unwrap();
        let out = write_export(&snap, &[], &[], layout, Vec::new()).unwrap();
        let f = BoltFile::open(&out).unwrap();
        let users = f.bucket(b"authUsers").unwrap().unwrap();
        let mut seen = Vec::new();
        f.for_each(&users, |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(b"root".to_vec(), b"user record".to_vec())]);
    }

    #[test]
    fn a_bump_marker_raises_the_revision_and_enabled_auth_is_refused() {
        let kv = mvccpb::KeyValue {
            key: bytes::Bytes::from_static(b"a"),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: bytes::Bytes::from_static(b"v"),
            lease: 0,
        }
        .encode_to_vec();
        let key = (
            b"key".to_vec(),
            vec![
                (rev_key(2, 0, false), kv),
                (rev_key(1002, 0, false), vec![]),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let run = |buckets: &crate::bolt::Buckets, name: &str| {
            let bytes = crate::bolt::build_file(buckets);
            let file = BoltFile::open(&bytes).unwrap();
            import(
                &file,
                &dir.path().join(name),
                (1, 1),
                None,
                Adjust::default(),
            )
        };
        let got = run(&vec![key.clone()], "a.db").unwrap();
        assert_eq!((got.revision, got.records), (1002, 1));
        let auth = (b"auth".to_vec(), vec![(b"authEnabled".to_vec(), vec![1])]);
        let err = run(&vec![auth, key], "b.db").unwrap_err().to_string();
        assert!(err.contains("auth is enabled"), "{err}");
    }

    /// Why importing the file `bytes` fails.
    fn import_error(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = BoltFile::open(bytes).unwrap();
        import(
            &file,
            &dir.path().join("x.db"),
            (1, 1),
            None,
            Adjust::default(),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn an_auth_name_too_long_to_keep_is_refused_not_a_panic() {
        let bytes = crate::bolt::build_file(&vec![(
            b"authUsers".to_vec(),
            vec![(vec![b'u'; 600], b"user".to_vec())],
        )]);
        let err = import_error(&bytes);
        assert!(err.contains("a name of 600 bytes"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_refused_by_name() {
        let bytes = crate::bolt::build_file(&vec![(
            b"key".to_vec(),
            vec![(
                rev_key(2, 0, false),
                b"\x0a\x01a\x10\x02\x18\x09\x20\x01".to_vec(),
            )],
        )]);
        let err = import_error(&bytes);
        assert!(err.contains("revision 2.0 says mod_revision 9"), "{err}");
    }
}
