//! kill -9 at a random moment under many concurrent writers, restart on the same data dir, and
//! check that every acknowledged write is there with the revision it was acknowledged at.
//! Repeated over bounded cycles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel_proto::pb;
use rand::{Rng, SeedableRng};

use crate::harness::{kv, Keel};

const WRITERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    kill_9_cycles(20).await;
}

/// The soak: `scripts/soak.sh` runs it (200 cycles, a few minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn acknowledged_writes_survive_kill_9_soak() {
    kill_9_cycles(200).await;
}

async fn kill_9_cycles(cycles: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut keel = Keel::start_async(dir.path(), &[]).await;
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // key -> (value, revision) of every acknowledged put, across all cycles.
    let acked: Arc<Mutex<HashMap<String, (String, i64)>>> = Default::default();
    for cycle in 0..cycles {
        let url = keel.url();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let acked = acked.clone();
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = kv(&url);
                // Bounded: at most 100k puts per writer per cycle; the kill ends it sooner.
                for i in 0..100_000u32 {
                    // Half the writers overwrite a small set of shared keys.
                    let key = if w % 2 == 0 {
                        format!("c{cycle}/w{w}/{i}")
                    } else {
                        format!("shared/{}", i % 7)
                    };
                    let value = format!("{cycle}.{w}.{i}");
                    let req = pb::PutRequest {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(value.clone()),
                        ..Default::default()
                    };
                    match c.put(req).await {
                        Ok(r) => {
                            let rev = r.into_inner().header.unwrap().revision;
                            let mut a = acked.lock().unwrap();
                            let newer = a.get(&key).is_none_or(|(_, old)| *old < rev);
                            if newer {
                                a.insert(key, (value, rev));
                            }
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        let run_ms = rng.gen_range(30..400);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        keel = tokio::task::spawn_blocking(move || {
            keel.kill9();
            keel
        })
        .await
        .unwrap();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("writers stop once the server is gone")
                .unwrap();
        }
        keel = tokio::task::spawn_blocking(move || {
            keel.restart();
            keel
        })
        .await
        .unwrap();
        let snapshot = acked.lock().unwrap().clone();
        verify(&keel.url(), &snapshot, cycle).await;
    }
    let total = acked.lock().unwrap().len();
    assert!(total > cycles, "the writers did write");
    eprintln!("{cycles} kill -9 cycles: {total} acknowledged keys, all present");
}

async fn verify(url: &str, acked: &HashMap<String, (String, i64)>, cycle: usize) {
    let mut c = kv(url);
    let all = c
        .range(pb::RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let have: HashMap<String, (String, i64)> = all
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key.to_vec()).unwrap(),
                (
                    String::from_utf8(kv.value.to_vec()).unwrap(),
                    kv.mod_revision,
                ),
            )
        })
        .collect();
    let current = all.header.unwrap().revision;
    for (key, (value, rev)) in acked {
        let got = have
            .get(key)
            .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged {key} lost"));
        assert!(*rev <= current, "cycle {cycle}: revision went backwards");
        if key.starts_with("shared/") {
            // A later put may have been applied but not acknowledged before the kill.
            assert!(got.1 >= *rev, "cycle {cycle}: {key} older than its ack");
        } else {
            assert_eq!(got, &(value.clone(), *rev), "cycle {cycle}: {key}");
        }
    }
}
