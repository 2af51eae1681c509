//! Request validation at the edge, in etcd's order and with etcd's errors
//! (`server/etcdserver/api/v3rpc/key.go`): bad input is answered before it reaches raft.

use std::collections::HashSet;

use bytes::Bytes;
use keel_proto::pb;
use keel_proto::pb::request_op::Request;

use crate::error::ApiError;

/// Whether a range asks for any of the min/max mod/create revision filters.
pub fn has_revision_filters(r: &pb::RangeRequest) -> bool {
    r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

pub fn check_range(r: &pb::RangeRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &pb::PutRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(ApiError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(ApiError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &pb::DeleteRangeRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::EmptyKey);
    }
    Ok(())
}

/// The whole txn check: sizes and keys, then put/delete overlaps per branch.
pub fn check_txn_all(r: &pb::TxnRequest, max_txn_ops: usize) -> Result<(), ApiError> {
    check_txn(r, max_txn_ops as i64)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn(r: &pb::TxnRequest, max_txn_ops: i64) -> Result<(), ApiError> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(ApiError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ApiError::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        check_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_op(op: &pb::RequestOp, max_txn_ops: i64) -> Result<(), ApiError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn(r, max_txn_ops),
        None => Err(ApiError::KeyNotFound),
    }
}

/// A key interval in etcd's "affine" order: an empty end is +infinity.
#[derive(Clone, Debug)]
struct Interval {
    begin: Bytes,
    end: Bytes,
}

impl Interval {
    fn point(k: &Bytes) -> Interval {
        let mut end = k.to_vec();
        end.push(0);
        Interval {
            begin: k.clone(),
            end: end.into(),
        }
    }

    fn contains_point(&self, p: &[u8]) -> bool {
        p >= &self.begin[..] && (self.end.is_empty() || p < &self.end[..])
    }
}

fn intersects(dels: &[Interval], k: &[u8]) -> bool {
    dels.iter().any(|d| d.contains_point(k))
}

/// etcd's checkIntervals: within one branch, a key may be put once, and not put inside a
/// range deleted at the same or an outer level; a nested txn's then/else may put the same key.
fn check_intervals(reqs: &[pb::RequestOp]) -> Result<(HashSet<Bytes>, Vec<Interval>), ApiError> {
    let mut dels: Vec<Interval> = Vec::new();
    for op in reqs {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            dels.push(if d.range_end.is_empty() {
                Interval::point(&d.key)
            } else {
                Interval {
                    begin: d.key.clone(),
                    end: d.range_end.clone(),
                }
            });
        }
    }
    let mut puts: HashSet<Bytes> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects(&dels, k) {
                return Err(ApiError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(ApiError::DuplicateKey);
            }
            if intersects(&dels, k) {
                return Err(ApiError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || intersects(&dels, &p.key) {
            return Err(ApiError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                range_end: Bytes::copy_from_slice(end.as_bytes()),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<pb::RequestOp>, failure: Vec<pb::RequestOp>) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    fn nested(t: pb::TxnRequest) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestTxn(t)),
        }
    }

    #[test]
    fn duplicate_key_rules_match_etcd() {
        let ok = |t: pb::TxnRequest| check_txn_all(&t, 128);
        assert_eq!(
            ok(txn(vec![put("a"), put("a")], vec![])),
            Err(ApiError::DuplicateKey)
        );
        assert_eq!(
            ok(txn(vec![put("a")], vec![put("a")])),
            Ok(()),
            "branches are apart"
        );
        assert_eq!(
            ok(txn(vec![del("a", "c"), put("b")], vec![])),
            Err(ApiError::DuplicateKey)
        );
        assert_eq!(
            ok(txn(vec![del("a", ""), put("a")], vec![])),
            Err(ApiError::DuplicateKey)
        );
        assert_eq!(ok(txn(vec![del("a", ""), del("a", "")], vec![])), Ok(()));
        assert_eq!(
            ok(txn(vec![del("a", "\0"), put("b")], vec![])),
            Ok(()),
            "etcd's interval for a \\0 range_end is empty"
        );
        let inner = txn(vec![put("x")], vec![put("x")]);
        assert_eq!(ok(txn(vec![nested(inner.clone())], vec![])), Ok(()));
        assert_eq!(
            ok(txn(vec![nested(inner.clone()), put("x")], vec![])),
            Err(ApiError::DuplicateKey)
        );
        assert_eq!(
            ok(txn(vec![del("w", "y"), nested(inner)], vec![])),
            Err(ApiError::DuplicateKey)
        );
    }

    #[test]
    fn sizes_and_empty_keys() {
        let many: Vec<pb::RequestOp> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(
            check_txn_all(&txn(many, vec![]), 128),
            Err(ApiError::TooManyOps)
        );
        let empty_op = pb::RequestOp { request: None };
        assert_eq!(
            check_txn_all(&txn(vec![empty_op], vec![]), 128),
            Err(ApiError::KeyNotFound)
        );
        assert_eq!(
            check_txn_all(&txn(vec![put("")], vec![]), 128),
            Err(ApiError::EmptyKey)
        );
        let bad = pb::PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&bad), Err(ApiError::ValueProvided));
    }
}
