use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::file::{CrashFile, MmapFile};
use super::*;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// A backend that grows its in-memory file in small steps (crash images copy it whole).
fn small(file: CrashFile) -> Result<Backend<CrashFile>> {
    Backend::open_with(
        file,
        Options {
            grow_bytes_min: 64 << 10,
            ..Options::default()
        },
    )
}

fn key(rng: &mut StdRng) -> Vec<u8> {
    // Revision-like keys (appends) mixed with random ones (updates, deletes in the middle).
    if rng.gen_bool(0.5) {
        format!("r{:08}", rng.gen_range(0..3000)).into_bytes()
    } else {
        let n = rng.gen_range(1..40);
        (0..n).map(|_| rng.gen_range(b'a'..=b'f')).collect()
    }
}

fn value(rng: &mut StdRng) -> Vec<u8> {
    let n = match rng.gen_range(0..20) {
        0 => rng.gen_range(1000..20_000), // overflow runs
        1 => 0,
        _ => rng.gen_range(1..300),
    };
    vec![rng.gen::<u8>(); n]
}

/// Applies a random batch to both the model and the transaction.
fn random_batch<F: PageFile>(rng: &mut StdRng, txn: &mut WriteTxn<'_, F>, model: &mut Model) {
    for _ in 0..rng.gen_range(1..60) {
        let k = key(rng);
        if rng.gen_bool(0.3) {
            let was = txn.delete(&k).unwrap();
            assert_eq!(was, model.remove(&k).is_some());
        } else {
            let v = value(rng);
            txn.put(&k, &v).unwrap();
            model.insert(k, v);
        }
    }
}

/// `n` committed transactions of random changes, applied to the model too.
fn random_commits<F: PageFile>(b: &mut Backend<F>, rng: &mut StdRng, model: &mut Model, n: usize) {
    for _ in 0..n {
        let mut txn = b.write().unwrap();
        random_batch(rng, &mut txn, model);
        txn.commit().unwrap();
    }
}

fn contents<F: PageFile>(snap: &Snapshot<F>) -> Model {
    let mut got = Model::new();
    let mut last: Option<Vec<u8>> = None;
    snap.range(b"", None, |k, v| {
        assert!(last.as_deref() < Some(k), "keys in order");
        last = Some(k.to_vec());
        got.insert(k.to_vec(), v.to_vec());
        true
    })
    .unwrap();
    got
}

fn check<F: PageFile>(snap: &Snapshot<F>, model: &Model) {
    assert_eq!(&contents(snap), model);
    for (k, v) in model.iter().take(50) {
        assert_eq!(snap.get(k).unwrap(), Some(&v[..]));
    }
    assert_eq!(snap.get(b"\xffnot there").unwrap(), None);
}

#[test]
fn random_transactions_match_a_model_and_survive_reopen() {
    let mut rng = StdRng::seed_from_u64(7);
    let file = CrashFile::new();
    let mut b = small(file.clone()).unwrap();
    let mut model = Model::new();
    for round in 0..200 {
        let mut txn = b.write().unwrap();
        random_batch(&mut rng, &mut txn, &mut model);
        if round % 10 == 9 {
            drop(txn); // rolled back
            let s = b.snapshot();
            model = contents(&s);
            continue;
        }
        let probe = key(&mut rng);
        assert_eq!(txn.get(&probe).unwrap(), model.get(&probe).cloned());
        txn.commit().unwrap();
        check(&b.snapshot(), &model);
    }
    drop(b);
    let b = small(file).unwrap();
    check(&b.snapshot(), &model);
}

#[test]
fn ranges_stop_at_end_and_when_asked() {
    let mut b = small(CrashFile::new()).unwrap();
    let mut txn = b.write().unwrap();
    for i in 0..5000u32 {
        txn.put(format!("k{i:05}").as_bytes(), &i.to_le_bytes())
            .unwrap();
    }
    txn.commit().unwrap();
    let s = b.snapshot();
    let mut got = Vec::new();
    s.range(b"k01000", Some(b"k01003"), |k, _| {
        got.push(k.to_vec());
        true
    })
    .unwrap();
    assert_eq!(got, [b"k01000", b"k01001", b"k01002"]);
    let mut n = 0;
    s.range(b"k04990x", None, |_, _| {
        n += 1;
        n < 3
    })
    .unwrap();
    assert_eq!(n, 3);
}

#[test]
fn a_snapshot_held_by_a_reader_keeps_its_pages() {
    // The real file: its map shows later writes, so reusing a held page would show here.
    let dir = tempfile::tempdir().unwrap();
    let mut b = Backend::open(MmapFile::open(&dir.path().join("db")).unwrap()).unwrap();
    let mut txn = b.write().unwrap();
    for i in 0..2000u32 {
        txn.put(&i.to_be_bytes(), &[1; 100]).unwrap();
    }
    txn.commit().unwrap();
    let old = b.reader().snapshot();
    for round in 0..20u8 {
        let mut txn = b.write().unwrap();
        for i in 0..2000u32 {
            txn.put(&i.to_be_bytes(), &[round + 2; 100]).unwrap();
        }
        txn.commit().unwrap();
    }
    // Twenty rewrites later the old snapshot still reads its own values.
    let mut n = 0;
    old.range(b"", None, |_, v| {
        assert_eq!(v, [1; 100]);
        n += 1;
        true
    })
    .unwrap();
    assert_eq!(n, 2000);
    let held = b.space();
    drop(old);
    // Once released, its pages are reused: the file stops growing.
    for _ in 0..5 {
        let mut txn = b.write().unwrap();
        for i in 0..2000u32 {
            txn.put(&i.to_be_bytes(), &[9; 100]).unwrap();
        }
        txn.commit().unwrap();
    }
    assert!(
        b.space().pages <= held.pages,
        "{:?} -> {:?}",
        held,
        b.space()
    );
}

#[test]
fn deleting_everything_frees_the_tree() {
    let mut b = small(CrashFile::new()).unwrap();
    let mut txn = b.write().unwrap();
    for i in 0..3000u32 {
        txn.put(&i.to_be_bytes(), &vec![3; 1 + (i as usize % 3000)])
            .unwrap();
    }
    txn.commit().unwrap();
    let full = b.space();
    let mut txn = b.write().unwrap();
    for i in 0..3000u32 {
        assert!(txn.delete(&i.to_be_bytes()).unwrap());
    }
    txn.commit().unwrap();
    assert_eq!(b.snapshot().meta.root, 0);
    // Two more commits let the pending pages come free.
    b.write().unwrap().commit().unwrap();
    b.write().unwrap().commit().unwrap();
    let s = b.space();
    let freelist_pages = page::run_pages(8 + 8 * s.pages as usize) as u64;
    assert!(
        s.pages <= full.pages + freelist_pages,
        "at most the freelist grew: {full:?} {s:?}"
    );
    assert!(s.free_pages + 3 >= s.pages, "nearly all free: {s:?}");
}

/// Runs random commits on a file that dies at operation `die_at`, then reopens what a power
/// cut at that moment could leave (unsynced writes lost, kept or torn, chosen by `seed`).
/// The state must be the last acknowledged commit, or the one in flight if its meta made it.
fn crash_case(seed: u64, die_at: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let file = CrashFile::new();
    let mut acked = Model::new();
    let mut in_flight = None;
    let mut b = small(file.clone()).unwrap();
    file.die_at(die_at);
    for _ in 0..30 {
        let mut next = acked.clone();
        let mut txn = match b.write() {
            Ok(t) => t,
            Err(_) => break,
        };
        random_batch(&mut rng, &mut txn, &mut next);
        match txn.commit() {
            Ok(()) => acked = next,
            Err(_) => {
                in_flight = Some(next);
                break;
            }
        }
    }
    drop(b);
    let image = file.crash_image(|n| rng.gen_range(0..n));
    let b = small(CrashFile::from_bytes(image)).expect("reopens after any crash");
    let got = contents(&b.snapshot());
    assert!(
        got == acked || in_flight.as_ref() == Some(&got),
        "seed {seed} die_at {die_at}: state is neither the acked commit nor the one in flight"
    );
}

#[test]
fn a_crash_at_any_write_or_sync_keeps_the_last_acknowledged_commit() {
    // Opening takes 3 operations; each commit a handful: cover the first commits densely.
    // KEEL_CRASH_SEEDS (default 8) sets the seeds per crash point (scripts/fuzz-smoke.sh
    // runs many more).
    let seeds = crate::test_cases("KEEL_CRASH_SEEDS", 8) as u64;
    for die_at in 0..120 {
        for seed in 0..seeds {
            crash_case(seed * 1000 + die_at, die_at);
        }
    }
}

#[test]
fn a_bad_page_is_reported_never_served() {
    let file = CrashFile::new();
    let mut b = small(file.clone()).unwrap();
    let mut txn = b.write().unwrap();
    for i in 0..500u32 {
        txn.put(&i.to_be_bytes(), b"value").unwrap();
    }
    txn.commit().unwrap();
    let root = b.snapshot().meta.root;
    drop(b);
    let mut image = file.crash_image(|_| 0);
    image[root as usize * PAGE_BYTES + 100] ^= 1;
    let b = small(CrashFile::from_bytes(image)).unwrap();
    let err = b.snapshot().get(&7u32.to_be_bytes()).unwrap_err();
    assert!(matches!(err, crate::Error::Corrupted { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn torn_meta_falls_back_to_the_other_one() {
    let file = CrashFile::new();
    let mut b = small(file.clone()).unwrap();
    let mut txn = b.write().unwrap();
    txn.put(b"a", b"1").unwrap();
    txn.commit().unwrap();
    let mut txn = b.write().unwrap();
    txn.put(b"a", b"2").unwrap();
    txn.commit().unwrap();
    let slot = b.snapshot().txid() % 2;
    drop(b);
    let mut image = file.crash_image(|_| 0);
    image[slot as usize * PAGE_BYTES + 17] ^= 0xff;
    let b = small(CrashFile::from_bytes(image)).unwrap();
    assert_eq!(b.snapshot().get(b"a").unwrap(), Some(&b"1"[..]));
}

#[test]
fn the_real_file_maps_reads_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let mut model = Model::new();
    {
        let mut b = Backend::open(MmapFile::open(&path).unwrap()).unwrap();
        random_commits(&mut b, &mut StdRng::seed_from_u64(3), &mut model, 40);
        let mut txn = b.write().unwrap();
        let big = vec![5u8; 20 << 20]; // past the first growth step: the map is rebuilt
        txn.put(b"big", &big).unwrap();
        model.insert(b"big".to_vec(), big);
        txn.commit().unwrap();
        check(&b.snapshot(), &model);
    }
    let b = Backend::open(MmapFile::open(&path).unwrap()).unwrap();
    check(&b.snapshot(), &model);
}

#[test]
fn a_compact_copy_holds_the_same_tree_in_fewer_pages() {
    let mut b = small(CrashFile::new()).unwrap();
    let mut model = Model::new();
    random_commits(&mut b, &mut StdRng::seed_from_u64(11), &mut model, 60);
    let mut txn = b.write().unwrap();
    let doomed: Vec<Vec<u8>> = model.keys().step_by(2).cloned().collect();
    for k in &doomed {
        txn.delete(k).unwrap();
        model.remove(k);
    }
    txn.commit().unwrap();
    let held = b.snapshot();
    let copy = b
        .compact_copy(
            CrashFile::new(),
            Options {
                grow_bytes_min: 64 << 10,
                durable_commits: false,
            },
            20_000,
            |_| true,
        )
        .unwrap();
    check(&copy.snapshot(), &model);
    assert!(
        copy.space().pages < b.space().pages,
        "{:?} vs {:?}",
        copy.space(),
        b.space()
    );
    b.replace_with(copy);
    check(&b.snapshot(), &model);
    check(&held, &model);
    // Writes go on in the new file.
    let mut txn = b.write().unwrap();
    txn.put(b"after", b"defrag").unwrap();
    txn.commit().unwrap();
    model.insert(b"after".to_vec(), b"defrag".to_vec());
    check(&b.snapshot(), &model);
}

/// A file whose tree is the one (sealed) page `root`, behind valid metas.
fn root_page_file(root: &[u8]) -> CrashFile {
    let meta = Meta {
        txid: 5,
        root: 2,
        freelist: 0,
        page_count: 3,
    };
    let mut file = meta.encode().to_vec();
    file.extend_from_slice(&Meta { txid: 4, ..meta }.encode());
    file.extend_from_slice(root);
    CrashFile::from_bytes(file)
}

/// Found by the backend_pages fuzz target: a root branch with no children (checksummed, so
/// only a bug could write it) made a write transaction index an empty list and panic.
#[test]
fn a_branch_without_children_is_corruption_not_a_panic() {
    let mut branch = vec![0u8; page::PAGE_BYTES];
    page::seal(&mut branch, page::KIND_BRANCH, 0);
    let mut db = Backend::open(root_page_file(&branch)).unwrap();
    let mut t = db.write().unwrap();
    let err = t.put(b"key", b"value").unwrap_err().to_string();
    assert!(err.contains("branch page with no children"), "{err}");
}

/// Found by the backend_pages fuzz target: a leaf whose value points at an overflow run past
/// the file; overwriting it freed those pages (and overflowed computing them).
#[test]
fn an_overflow_run_outside_the_file_is_corruption() {
    let mut leaf = page::encode_leaf(&[(
        b"key".as_slice(),
        &page::LeafBytes::Overflow {
            page: u64::MAX - 1,
            len: 10_000,
        },
    )]);
    page::seal(&mut leaf, page::KIND_LEAF, 1);
    let mut db = Backend::open(root_page_file(&leaf)).unwrap();
    let mut t = db.write().unwrap();
    let err = t.put(b"key", b"value").unwrap_err().to_string();
    assert!(err.contains("overflow run at page"), "{err}");
}
