//! Applying committed requests to the MVCC store with etcd's semantics
//! (etcd `server/etcdserver/apply.go`): the order of checks, which revision each response
//! header carries, txn compare rules, and range sort/filter/limit. Runs on the raft core; the
//! read-only `range` also runs on net cores against the published state.

use keel_net::{ApiError, WriteResponse};
use keel_proto::keelpb::InternalRequest;
use keel_proto::mvccpb::KeyValue;
use keel_proto::pb;
use keel_proto::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::pb::range_request::{SortOrder, SortTarget};
use keel_proto::pb::request_op::Request;
use keel_proto::pb::response_op::Response;
use keel_storage::mvcc::{KeyRange, RangeOptions, ReadView, WriteTxn};
use keel_storage::store::Store;

#[cfg(test)]
use crate::lease::MAX_LEASE_TTL;
use crate::lease::{LeaseBook, Leases};

pub fn storage_err(e: keel_storage::Error) -> ApiError {
    match e {
        keel_storage::Error::Compacted => ApiError::Compacted,
        keel_storage::Error::FutureRev => ApiError::FutureRev,
        other => ApiError::Internal(other.to_string()),
    }
}

fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Applies one committed request.
pub fn apply(
    store: &mut Store,
    leases: &mut LeaseBook,
    req: InternalRequest,
) -> Result<WriteResponse, ApiError> {
    // With NOSPACE raised, what grows the store is refused (etcd's capped applier); reads,
    // deletes, compaction and alarms go on.
    let capped = store.alarms().iter().any(|a| a.1 == NOSPACE);
    if let Some(p) = req.put {
        if capped {
            return Err(ApiError::NoSpace);
        }
        if p.lease != 0 && !leases.shared.exists(p.lease) {
            return Err(ApiError::LeaseNotFound);
        }
        let mut t = store.write();
        let resp = put(&mut t, &p)?;
        leases.track(t.changes());
        t.commit();
        return Ok(WriteResponse::Put(resp));
    }
    if let Some(d) = req.delete_range {
        let mut t = store.write();
        let resp = delete_range(&mut t, &d)?;
        leases.track(t.changes());
        t.commit();
        return Ok(WriteResponse::DeleteRange(resp));
    }
    if let Some(r) = req.txn {
        if capped && txn_cost_bytes(&r) > 0 {
            return Err(ApiError::NoSpace);
        }
        return txn(store, leases, &r).map(WriteResponse::Txn);
    }
    if let Some(g) = req.lease_grant {
        if capped {
            return Err(ApiError::NoSpace);
        }
        let ttl = leases.grant(store, g.id, g.ttl)?;
        return Ok(WriteResponse::LeaseGrant(pb::LeaseGrantResponse {
            header: header(store.mvcc().current_rev()),
            id: g.id,
            ttl,
            error: String::new(),
        }));
    }
    if let Some(r) = req.lease_revoke {
        leases.revoke(store, r.id)?;
        return Ok(WriteResponse::LeaseRevoke(pb::LeaseRevokeResponse {
            header: header(store.mvcc().current_rev()),
        }));
    }
    if let Some(a) = req.alarm {
        return Ok(WriteResponse::Alarm(alarm(store, &a)));
    }
    if let Some(c) = req.compaction {
        store.compact(c.revision).map_err(storage_err)?;
        return Ok(WriteResponse::Compact(pb::CompactionResponse {
            header: header(store.mvcc().current_rev()),
        }));
    }
    Err(ApiError::Internal("empty internal request".into()))
}

/// etcd's AlarmType NOSPACE.
pub const NOSPACE: i32 = pb::AlarmType::Nospace as i32;
/// etcd's quota estimate of what a key-value adds beyond its request (`kvOverhead`).
const KV_OVERHEAD_BYTES: usize = 256;

/// etcd's quota cost of a put: the request plus a fixed overhead.
pub fn put_cost_bytes(p: &pb::PutRequest) -> usize {
    use keel_proto::prost::Message;
    KV_OVERHEAD_BYTES + p.encoded_len()
}

/// etcd's quota cost of a txn: the costlier branch's puts (nested txns included).
pub fn txn_cost_bytes(t: &pb::TxnRequest) -> usize {
    let cost = |ops: &[pb::RequestOp]| -> usize {
        ops.iter()
            .map(|op| match &op.request {
                Some(Request::RequestPut(p)) => put_cost_bytes(p),
                Some(Request::RequestTxn(inner)) => txn_cost_bytes(inner),
                _ => 0,
            })
            .sum()
    };
    cost(&t.success).max(cost(&t.failure))
}

/// Alarms (etcd's applyAlarm): a get answers every alarm raised (or those of one type);
/// activating answers the alarm (also when it was already raised), deactivating answers it
/// if it was raised. A get goes through the log as the others do, as etcd's, so a member
/// that cannot reach a quorum does not answer it.
fn alarm(store: &mut Store, r: &pb::AlarmRequest) -> pb::AlarmResponse {
    use pb::alarm_request::AlarmAction;
    if AlarmAction::try_from(r.action) == Ok(AlarmAction::Get) {
        let alarms = store
            .alarms()
            .iter()
            .filter(|a| r.alarm == pb::AlarmType::None as i32 || a.1 == r.alarm)
            .map(|&(member_id, alarm)| pb::AlarmMember { member_id, alarm })
            .collect();
        return pb::AlarmResponse {
            header: header(store.mvcc().current_rev()),
            alarms,
        };
    }
    let member = (r.member_id, r.alarm);
    let answered = match AlarmAction::try_from(r.action) {
        Ok(AlarmAction::Activate) if r.alarm != pb::AlarmType::None as i32 => {
            if store.activate_alarm(member) {
                tracing::warn!(
                    member = format!("{:x}", r.member_id),
                    alarm = r.alarm,
                    "alarm raised"
                );
            }
            true
        }
        Ok(AlarmAction::Deactivate) => store.deactivate_alarm(member),
        _ => false,
    };
    pb::AlarmResponse {
        header: header(store.mvcc().current_rev()),
        alarms: if answered {
            vec![pb::AlarmMember {
                member_id: r.member_id,
                alarm: r.alarm,
            }]
        } else {
            Vec::new()
        },
    }
}

fn put(t: &mut WriteTxn<'_>, p: &pb::PutRequest) -> Result<pb::PutResponse, ApiError> {
    let needs_prev = p.ignore_value || p.ignore_lease;
    let prev = if needs_prev || p.prev_kv {
        t.get(&p.key).map_err(storage_err)?
    } else {
        None
    };
    if needs_prev && prev.is_none() {
        return Err(ApiError::KeyNotFound);
    }
    let value = match (&prev, p.ignore_value) {
        (Some(kv), true) => kv.value.clone(),
        _ => p.value.clone(),
    };
    let lease = match (&prev, p.ignore_lease) {
        (Some(kv), true) => kv.lease,
        _ => p.lease,
    };
    let rev = t.put(&p.key, value, lease);
    Ok(pb::PutResponse {
        header: header(rev),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

fn delete_range(
    t: &mut WriteTxn<'_>,
    d: &pb::DeleteRangeRequest,
) -> Result<pb::DeleteRangeResponse, ApiError> {
    let range = KeyRange::from_request(&d.key, &d.range_end);
    let prev_kvs = if d.prev_kv {
        t.range(range, RangeOptions::default())
            .map_err(storage_err)?
            .kvs
    } else {
        Vec::new()
    };
    let deleted = t.delete_range(range);
    Ok(pb::DeleteRangeResponse {
        header: header(t.rev()),
        deleted,
        prev_kvs,
    })
}

/// etcd's Range: fetch (one extra for `more`), filter, sort, truncate.
pub fn range(view: &impl ReadView, r: &pb::RangeRequest) -> Result<pb::RangeResponse, ApiError> {
    let sort_order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let filtered = keel_net::validate::has_revision_filters(r);
    let mut limit = r.limit;
    if sort_order != SortOrder::None || filtered {
        limit = 0;
    }
    if limit > 0 {
        limit += 1;
    }
    let rr = view
        .read(
            KeyRange::from_request(&r.key, &r.range_end),
            RangeOptions {
                limit: limit.max(0) as usize,
                rev: r.revision,
                count_only: r.count_only,
            },
        )
        .map_err(storage_err)?;
    let mut kvs = rr.kvs;
    if filtered {
        kvs.retain(|kv| {
            !(r.max_mod_revision != 0 && kv.mod_revision > r.max_mod_revision
                || r.min_mod_revision != 0 && kv.mod_revision < r.min_mod_revision
                || r.max_create_revision != 0 && kv.create_revision > r.max_create_revision
                || r.min_create_revision != 0 && kv.create_revision < r.min_create_revision)
        });
    }
    let order = if sort_target != SortTarget::Key && sort_order == SortOrder::None {
        SortOrder::Ascend
    } else {
        sort_order
    };
    if order != SortOrder::None {
        sort_kvs(&mut kvs, sort_target, order == SortOrder::Descend);
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value = Default::default();
        }
    }
    Ok(pb::RangeResponse {
        header: header(rr.rev),
        kvs,
        more,
        count: rr.count as i64,
    })
}

fn sort_kvs(kvs: &mut [KeyValue], target: SortTarget, descend: bool) {
    let key = |kv: &KeyValue| -> (i64, Option<bytes::Bytes>) {
        match target {
            SortTarget::Key => (0, Some(kv.key.clone())),
            SortTarget::Version => (kv.version, None),
            SortTarget::Create => (kv.create_revision, None),
            SortTarget::Mod => (kv.mod_revision, None),
            SortTarget::Value => (0, Some(kv.value.clone())),
        }
    };
    if descend {
        kvs.sort_by_key(|kv| std::cmp::Reverse(key(kv)));
    } else {
        kvs.sort_by_key(key);
    }
}

fn compare_all(view: &impl ReadView, cmps: &[pb::Compare]) -> bool {
    cmps.iter().all(|c| compare(view, c))
}

fn compare(view: &impl ReadView, c: &pb::Compare) -> bool {
    let Ok(rr) = view.read(
        KeyRange::from_request(&c.key, &c.range_end),
        RangeOptions::default(),
    ) else {
        return false;
    };
    let target = CompareTarget::try_from(c.target).ok();
    if rr.kvs.is_empty() {
        if target == Some(CompareTarget::Value) {
            // A missing key has no value to compare (nil == empty in gRPC): always false.
            return false;
        }
        return compare_kv(c, target, &KeyValue::default());
    }
    rr.kvs.iter().all(|kv| compare_kv(c, target, kv))
}

fn compare_kv(c: &pb::Compare, target: Option<CompareTarget>, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match target {
        Some(CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        Some(t) => {
            let have = match t {
                CompareTarget::Create => kv.create_revision,
                CompareTarget::Mod => kv.mod_revision,
                CompareTarget::Version => kv.version,
                CompareTarget::Lease => kv.lease,
                CompareTarget::Value => unreachable!("handled above"),
            };
            // The union names its own target; etcd compares against 0 when it names another.
            let named = match &c.target_union {
                Some(TargetUnion::CreateRevision(v)) => Some((CompareTarget::Create, *v)),
                Some(TargetUnion::ModRevision(v)) => Some((CompareTarget::Mod, *v)),
                Some(TargetUnion::Version(v)) => Some((CompareTarget::Version, *v)),
                Some(TargetUnion::Lease(v)) => Some((CompareTarget::Lease, *v)),
                Some(TargetUnion::Value(_)) | None => None,
            };
            let want = named.filter(|(nt, _)| *nt == t).map_or(0, |(_, v)| v);
            have.cmp(&want)
        }
        None => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

/// Which branch each txn on the taken path takes, evaluated on the state before the txn
/// (etcd's compareToPath): the outer txn first, then nested ones depth-first.
fn compare_to_path(view: &impl ReadView, t: &pb::TxnRequest, path: &mut Vec<bool>) {
    let ok = compare_all(view, &t.compare);
    path.push(ok);
    for op in branch(t, ok) {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            compare_to_path(view, inner, path);
        }
    }
}

fn branch(t: &pb::TxnRequest, ok: bool) -> &[pb::RequestOp] {
    if ok {
        &t.success
    } else {
        &t.failure
    }
}

/// etcd's checkRequests: every put and range on the taken path must be able to apply, so a
/// txn either applies whole or not at all.
fn check_path(
    view: &impl ReadView,
    leases: &Leases,
    t: &pb::TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<(), ApiError> {
    let ok = path[*at];
    *at += 1;
    for op in branch(t, ok) {
        match &op.request {
            Some(Request::RequestTxn(inner)) => check_path(view, leases, inner, path, at)?,
            Some(Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease)
                    && view
                        .read(KeyRange::Single(&p.key), RangeOptions::default())
                        .map_err(storage_err)?
                        .kvs
                        .is_empty()
                {
                    return Err(ApiError::KeyNotFound);
                }
                if p.lease != 0 && !leases.exists(p.lease) {
                    return Err(ApiError::LeaseNotFound);
                }
            }
            Some(Request::RequestRange(r)) => {
                if r.revision != 0 && r.revision > view.rev() {
                    return Err(ApiError::FutureRev);
                }
                if r.revision != 0 && r.revision < view.first_rev() {
                    return Err(ApiError::Compacted);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn apply_path(
    t: &mut WriteTxn<'_>,
    req: &pb::TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<pb::TxnResponse, ApiError> {
    let ok = path[*at];
    *at += 1;
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let resp = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(range(t, r)?),
            Some(Request::RequestPut(p)) => Response::ResponsePut(put(t, p)?),
            Some(Request::RequestDeleteRange(d)) => {
                Response::ResponseDeleteRange(delete_range(t, d)?)
            }
            Some(Request::RequestTxn(inner)) => {
                Response::ResponseTxn(apply_path(t, inner, path, at)?)
            }
            None => continue,
        };
        responses.push(pb::ResponseOp {
            response: Some(resp),
        });
    }
    Ok(pb::TxnResponse {
        // Nested txn responses carry an empty header in etcd; the outer one is set below.
        header: Some(pb::ResponseHeader::default()),
        succeeded: ok,
        responses,
    })
}

/// etcd's isTxnReadonly: no put or delete anywhere in it, nested txns and both branches
/// included.
pub fn txn_is_read_only(t: &pb::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
            Some(Request::RequestTxn(inner)) => txn_is_read_only(inner),
            _ => true,
        })
}

/// etcd's isTxnSerializable: every range in it is serializable.
pub fn txn_is_serializable(t: &pb::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(r)) => r.serializable,
            Some(Request::RequestTxn(inner)) => txn_is_serializable(inner),
            _ => true,
        })
}

/// A view pinned at one revision: a read-only txn's compares and ranges all see the same
/// state, whatever is applied meanwhile.
struct AtRev<'a, V: ReadView> {
    view: &'a V,
    rev: i64,
}

impl<V: ReadView> ReadView for AtRev<'_, V> {
    fn read(
        &self,
        range: KeyRange<'_>,
        mut opts: RangeOptions,
    ) -> keel_storage::Result<keel_storage::mvcc::RangeResult> {
        if opts.rev <= 0 {
            opts.rev = self.rev;
        }
        self.view.read(range, opts)
    }
    fn first_rev(&self) -> i64 {
        self.view.first_rev()
    }
    fn rev(&self) -> i64 {
        self.rev
    }
}

/// A read-only txn served from the published state (etcd serves them without raft): the
/// same compares and responses as through apply, at the current revision.
pub fn txn_read_only(
    view: &impl ReadView,
    r: &pb::TxnRequest,
) -> Result<pb::TxnResponse, ApiError> {
    let pinned = AtRev {
        view,
        rev: view.rev(),
    };
    let mut path = Vec::new();
    compare_to_path(&pinned, r, &mut path);
    check_path(&pinned, &Leases::new(0, 100, 1000), r, &path, &mut 0)?;
    let mut resp = read_path(&pinned, r, &path, &mut 0)?;
    resp.header = header(pinned.rev);
    Ok(resp)
}

fn read_path(
    view: &impl ReadView,
    req: &pb::TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<pb::TxnResponse, ApiError> {
    let ok = path[*at];
    *at += 1;
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let resp = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(range(view, r)?),
            Some(Request::RequestTxn(inner)) => {
                Response::ResponseTxn(read_path(view, inner, path, at)?)
            }
            _ => continue,
        };
        responses.push(pb::ResponseOp {
            response: Some(resp),
        });
    }
    Ok(pb::TxnResponse {
        header: Some(pb::ResponseHeader::default()),
        succeeded: ok,
        responses,
    })
}

fn txn(
    store: &mut Store,
    leases: &mut LeaseBook,
    r: &pb::TxnRequest,
) -> Result<pb::TxnResponse, ApiError> {
    let mut t = store.write();
    let mut path = Vec::new();
    compare_to_path(&*t, r, &mut path);
    check_path(&*t, &leases.shared, r, &path, &mut 0)?;
    let mut resp = apply_path(&mut t, r, &path, &mut 0)?;
    leases.track(t.changes());
    let rev = t.commit();
    resp.header = header(rev);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn put_req(k: &str, v: &str) -> InternalRequest {
        InternalRequest {
            put: Some(pb::PutRequest {
                key: b(k),
                value: b(v),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn del_req(k: &str, end: &str) -> InternalRequest {
        InternalRequest {
            delete_range: Some(pb::DeleteRangeRequest {
                key: b(k),
                range_end: b(end),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn rr(key: &str, end: &str) -> pb::RangeRequest {
        pb::RangeRequest {
            key: b(key),
            range_end: b(end),
            ..Default::default()
        }
    }

    fn keys(r: &pb::RangeResponse) -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect()
    }

    /// A lease book without leases.
    fn book() -> LeaseBook {
        LeaseBook::new(std::sync::Arc::new(Leases::new(1, 100, 1000)))
    }

    /// a@2 b@3 a@4 (version 2) c@5, in a store on a temporary backend.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = keel_storage::store::StoreOptions::default();
        let mut s = Store::open(&dir.path().join("db"), opts).unwrap();
        for (k, v) in [("a", "3"), ("b", "1"), ("a", "9"), ("c", "5")] {
            apply(&mut s, &mut book(), put_req(k, v)).unwrap();
        }
        (dir, s)
    }

    #[test]
    fn range_filters_sorts_and_limits_like_etcd() {
        let (_dir, s) = store();
        let m = s.mvcc().clone();
        let mut r = rr("a", "z");
        r.min_mod_revision = 3;
        r.max_create_revision = 3;
        assert_eq!(keys(&range(&*m, &r).unwrap()), ["a", "b"]);
        let mut r = rr("a", "z");
        r.sort_target = SortTarget::Version as i32; // NONE order + non-key target = ascend
        assert_eq!(keys(&range(&*m, &r).unwrap())[2], "a");
        let mut r = rr("a", "z");
        r.sort_target = SortTarget::Value as i32;
        r.sort_order = SortOrder::Descend as i32;
        assert_eq!(keys(&range(&*m, &r).unwrap()), ["a", "c", "b"]);
        let mut r = rr("a", "z");
        r.sort_target = SortTarget::Create as i32;
        r.sort_order = SortOrder::Descend as i32;
        r.limit = 2;
        let resp = range(&*m, &r).unwrap();
        assert_eq!(keys(&resp), ["c", "b"]);
        assert!(resp.more);
        assert_eq!(resp.count, 3);
        let mut r = rr("a", "z");
        r.count_only = true;
        r.limit = 1;
        let resp = range(&*m, &r).unwrap();
        assert!(resp.kvs.is_empty() && !resp.more && resp.count == 3);
        let mut r = rr("\0", "\0");
        r.keys_only = true;
        let resp = range(&*m, &r).unwrap();
        assert!(resp.kvs.iter().all(|kv| kv.value.is_empty()));
        assert_eq!(resp.header.unwrap().revision, 5);
    }

    fn cmp(key: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> pb::Compare {
        pb::Compare {
            result: result as i32,
            target: target as i32,
            key: b(key),
            target_union: Some(u),
            range_end: Bytes::new(),
        }
    }

    fn op_put(k: &str, v: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: b(k),
                value: b(v),
                ..Default::default()
            })),
        }
    }

    fn txn_req(
        c: Vec<pb::Compare>,
        s: Vec<pb::RequestOp>,
        f: Vec<pb::RequestOp>,
    ) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: c,
            success: s,
            failure: f,
        }
    }

    #[test]
    fn read_only_txns_answer_as_through_apply() {
        let (_d, mut s) = store();
        let cmp = |key: &str, v: &str| pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: b(key),
            target_union: Some(TargetUnion::Value(b(v))),
            ..Default::default()
        };
        let get = |k: &str, end: &str| pb::RequestOp {
            request: Some(Request::RequestRange(rr(k, end))),
        };
        for (c, nested) in [(cmp("a", "9"), false), (cmp("a", "3"), true)] {
            let inner = pb::TxnRequest {
                compare: vec![cmp("c", "5")],
                success: vec![get("b", "")],
                failure: vec![],
            };
            let mut failure = vec![get("a", "z")];
            if nested {
                failure.push(pb::RequestOp {
                    request: Some(Request::RequestTxn(inner)),
                });
            }
            let t = pb::TxnRequest {
                compare: vec![c],
                success: vec![get("a", ""), get("c", "")],
                failure,
            };
            assert!(txn_is_read_only(&t));
            assert!(!txn_is_serializable(&t));
            let local = txn_read_only(&**s.mvcc(), &t).unwrap();
            let req = InternalRequest {
                txn: Some(t),
                ..Default::default()
            };
            let applied = match apply(&mut s, &mut book(), req).unwrap() {
                WriteResponse::Txn(r) => r,
                _ => unreachable!(),
            };
            assert_eq!(local, applied);
        }
        let writes = pb::TxnRequest {
            failure: vec![pb::RequestOp {
                request: Some(Request::RequestTxn(pb::TxnRequest {
                    success: vec![pb::RequestOp {
                        request: Some(Request::RequestDeleteRange(Default::default())),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert!(
            !txn_is_read_only(&writes),
            "a delete in a nested failure branch"
        );
    }

    #[test]
    fn compares_on_every_target() {
        let (_dir, s) = store();
        let m = s.mvcc().clone();
        let t = |c: pb::Compare| compare(&*m, &c);
        use CompareResult::*;
        use CompareTarget::*;
        assert!(t(cmp("a", Version, Equal, TargetUnion::Version(2))));
        assert!(t(cmp("a", Create, Equal, TargetUnion::CreateRevision(2))));
        assert!(t(cmp("a", Mod, Greater, TargetUnion::ModRevision(3))));
        assert!(t(cmp("a", Value, Less, TargetUnion::Value(b("z")))));
        assert!(t(cmp("a", Lease, Equal, TargetUnion::Lease(0))));
        assert!(t(cmp("a", Value, NotEqual, TargetUnion::Value(b("3")))));
        assert!(!t(cmp("nope", Value, NotEqual, TargetUnion::Value(b("x")))));
        assert!(t(cmp("nope", Version, Equal, TargetUnion::Version(0))));
        assert!(t(cmp(
            "nope",
            Create,
            Equal,
            TargetUnion::CreateRevision(0)
        )));
        let mut over = cmp("a", Version, Greater, TargetUnion::Version(0));
        over.range_end = b("z");
        assert!(t(over.clone()), "every key in [a, z) exists");
        over.target_union = Some(TargetUnion::Version(1));
        assert!(!t(over), "b and c have version 1");
    }

    #[test]
    fn nested_txn_paths_are_decided_before_any_write() {
        let (_dir, mut s) = store();
        let m = s.mvcc().clone();
        use CompareResult::*;
        use CompareTarget::*;
        // Inner compare sees a=9 (pre-txn), even though the outer branch writes a=0 first.
        let inner = txn_req(
            vec![cmp("a", Value, Equal, TargetUnion::Value(b("9")))],
            vec![op_put("inner", "then")],
            vec![op_put("inner", "else")],
        );
        let outer = txn_req(
            vec![cmp("b", Version, Equal, TargetUnion::Version(1))],
            vec![
                op_put("a", "0"),
                pb::RequestOp {
                    request: Some(Request::RequestTxn(inner)),
                },
            ],
            vec![],
        );
        let resp = txn(&mut s, &mut book(), &outer).unwrap();
        assert!(resp.succeeded);
        assert_eq!(
            resp.header.as_ref().unwrap().revision,
            6,
            "one revision for all"
        );
        let Some(Response::ResponseTxn(inner)) = &resp.responses[1].response else {
            panic!("nested response");
        };
        assert!(inner.succeeded);
        assert_eq!(
            inner.header.as_ref().unwrap().revision,
            0,
            "etcd leaves it empty"
        );
        let got = range(&*m, &rr("inner", "")).unwrap();
        assert_eq!(got.kvs[0].value, b("then"));
        assert_eq!(got.kvs[0].mod_revision, 6);
    }

    #[test]
    fn failed_txn_check_writes_nothing() {
        let (_dir, mut s) = store();
        let m = s.mvcc().clone();
        let mut leased = op_put("x", "1");
        if let Some(Request::RequestPut(p)) = &mut leased.request {
            p.lease = 42;
        }
        let r = txn_req(vec![], vec![op_put("y", "1"), leased], vec![]);
        assert_eq!(
            txn(&mut s, &mut book(), &r).unwrap_err(),
            ApiError::LeaseNotFound
        );
        assert_eq!(m.current_rev(), 5);
        assert_eq!(range(&*m, &rr("y", "")).unwrap().count, 0);
    }

    #[test]
    fn ignore_value_and_lease_keep_the_previous_ones() {
        let (_dir, mut s) = store();
        let m = s.mvcc().clone();
        let req = InternalRequest {
            put: Some(pb::PutRequest {
                key: b("a"),
                ignore_value: true,
                prev_kv: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let WriteResponse::Put(p) = apply(&mut s, &mut book(), req).unwrap() else {
            panic!("put response");
        };
        assert_eq!(p.prev_kv.unwrap().value, b("9"));
        let kv = &range(&*m, &rr("a", "")).unwrap().kvs[0];
        assert_eq!((kv.value.clone(), kv.version), (b("9"), 3));
    }

    #[test]
    fn leases_grant_attach_and_revoke_their_keys_in_one_revision() {
        let (_dir, mut s) = store();
        let m = s.mvcc().clone();
        let mut leases = book();
        let grant = |id, ttl| InternalRequest {
            lease_grant: Some(pb::LeaseGrantRequest { id, ttl }),
            ..Default::default()
        };
        let Ok(WriteResponse::LeaseGrant(g)) = apply(&mut s, &mut leases, grant(7, 1)) else {
            panic!("grant");
        };
        assert_eq!((g.id, g.ttl), (7, 2), "raised to the minimum TTL");
        let again = apply(&mut s, &mut leases, grant(7, 10));
        assert_eq!(again.unwrap_err(), ApiError::LeaseExists);
        let huge = apply(&mut s, &mut leases, grant(8, MAX_LEASE_TTL + 1));
        assert_eq!(huge.unwrap_err(), ApiError::LeaseTtlTooLarge);
        let leased = |k: &str, lease| InternalRequest {
            put: Some(pb::PutRequest {
                key: b(k),
                value: b("v"),
                lease,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            apply(&mut s, &mut leases, leased("x", 9)).unwrap_err(),
            ApiError::LeaseNotFound
        );
        for k in ["l1", "l2", "l3"] {
            apply(&mut s, &mut leases, leased(k, 7)).unwrap();
        }
        // Put without the lease detaches l3; l2 goes by delete; ignore_lease keeps l1's.
        apply(&mut s, &mut leases, leased("l3", 0)).unwrap();
        apply(&mut s, &mut leases, del_req("l2", "")).unwrap();
        let keep = InternalRequest {
            put: Some(pb::PutRequest {
                key: b("l1"),
                value: b("w"),
                ignore_lease: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        apply(&mut s, &mut leases, keep).unwrap();
        let lease = leases.shared.get(7).unwrap();
        assert_eq!(lease.keys(), [b("l1")]);
        let before = m.current_rev();
        let revoke = InternalRequest {
            lease_revoke: Some(pb::LeaseRevokeRequest { id: 7 }),
            ..Default::default()
        };
        apply(&mut s, &mut leases, revoke.clone()).unwrap();
        assert_eq!(m.current_rev(), before + 1, "one revision");
        assert!(range(&*m, &rr("l1", "")).unwrap().kvs.is_empty());
        assert_eq!(range(&*m, &rr("l3", "")).unwrap().count, 1);
        assert!(!leases.shared.exists(7));
        assert!(s.leases().is_empty());
        assert_eq!(
            apply(&mut s, &mut leases, revoke).unwrap_err(),
            ApiError::LeaseNotFound
        );
    }
}
