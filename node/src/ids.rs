//! Member and cluster IDs, computed exactly as etcd computes them for a new cluster, so a Keel
//! member started with etcd's flags reports the IDs etcd would (the default member is
//! 8e9e05c52164694d in cluster cdf818194e3a8c32, as etcd's).

use sha1::{Digest, Sha1};

/// sha1(sorted peer URLs joined, then the cluster token); the first 8 bytes, big-endian.
pub fn member_id(peer_urls: &[String], cluster_token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(cluster_token.as_bytes());
    first_u64(&h.finalize())
}

/// The ID of a member added at runtime (etcd's MemberAdd: the sorted peer URLs joined, no
/// cluster name, then the Unix time in seconds as decimal text).
pub fn added_member_id(peer_urls: &[String], unix_secs: u64) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(unix_secs.to_string().as_bytes());
    first_u64(&h.finalize())
}

/// sha1 of the sorted member IDs, each 8 bytes big-endian; the first 8 bytes, big-endian.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    first_u64(&h.finalize())
}

fn first_u64(d: &[u8]) -> u64 {
    u64::from_be_bytes(d[..8].try_into().expect("sha1 has 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_member_matches_etcd() {
        let m = member_id(&["http://localhost:2380".to_string()], "etcd-cluster");
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m])), "cdf818194e3a8c32");
    }
}
