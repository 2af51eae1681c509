//! WAL recovery against the damage a crash or a bad disk leaves: a torn last record (cut at
//! every byte offset, as zeros or as garbage) must recover everything before it; a flipped bit
//! in an earlier record must be refused, naming the file and offset.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use keel_storage::wal::{segment_path, Wal, WalOptions, HEADER_BYTES};
use keel_storage::Error;

fn opts() -> WalOptions {
    WalOptions {
        segment_bytes: 64 << 10,
        align_bytes: Some(512),
    }
}

fn payload(i: usize) -> Vec<u8> {
    (0..300 + i * 7).map(|j| (i * 31 + j) as u8).collect()
}

/// Writes `n` records; returns their positions.
fn write_records(dir: &Path, n: usize) -> Vec<keel_storage::wal::RecordPos> {
    let (mut wal, _) = Wal::open(dir, opts()).unwrap();
    for i in 0..n {
        wal.append(&[(2, &payload(i))]).unwrap();
    }
    drop(wal);
    let (_, rec) = Wal::open(dir, opts()).unwrap();
    assert_eq!(rec.records.len(), n);
    rec.positions
}

fn patch(dir: &Path, seq: u64, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(segment_path(dir, seq))
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn torn_last_record_recovers_at_every_byte_offset() {
    let base = tempfile::tempdir().unwrap();
    let n = 5;
    let pos = write_records(base.path(), n);
    let last = *pos.last().unwrap();
    let original = std::fs::read(segment_path(base.path(), last.segment_seq)).unwrap();
    for garbage in [false, true] {
        for cut in 0..last.len_bytes {
            let dir = tempfile::tempdir().unwrap();
            let seg = segment_path(dir.path(), last.segment_seq);
            std::fs::write(&seg, &original).unwrap();
            // The write reached the disk only up to `cut`; the rest is zeros or junk.
            let tail_len = (last.len_bytes - cut) as usize;
            let tail: Vec<u8> = if garbage {
                (0..tail_len)
                    .map(|i| (i as u8).wrapping_mul(151) | 1)
                    .collect()
            } else {
                vec![0u8; tail_len]
            };
            patch(dir.path(), last.segment_seq, last.offset + cut, &tail);
            let (mut wal, rec) = Wal::open(dir.path(), opts())
                .unwrap_or_else(|e| panic!("cut at {cut} (garbage={garbage}): {e}"));
            // A cut inside the zero padding after the payload loses nothing the CRC covers.
            let meaningful = (HEADER_BYTES + payload(n - 1).len()) as u64;
            let kept = if cut >= meaningful { n } else { n - 1 };
            assert_eq!(rec.records.len(), kept, "cut at {cut} garbage={garbage}");
            for (i, r) in rec.records.iter().enumerate() {
                assert_eq!(r.payload, payload(i));
            }
            // The log continues cleanly after the last good record.
            wal.append(&[(2, b"next")]).unwrap();
            drop(wal);
            let (_, rec) = Wal::open(dir.path(), opts()).unwrap();
            assert_eq!(rec.records.len(), kept + 1);
            assert_eq!(rec.records[kept].payload, b"next");
            assert_eq!(rec.torn_tail_bytes, 0, "the repair was made durable");
        }
    }
}

#[test]
fn flipped_bit_in_the_middle_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let pos = write_records(dir.path(), 9);
    let victim = pos[4];
    for byte in [0u64, 5, 9, 20, 100] {
        let seg = segment_path(dir.path(), victim.segment_seq);
        let data = std::fs::read(&seg).unwrap();
        let at = victim.offset + byte;
        let flipped = data[at as usize] ^ 0x10;
        patch(dir.path(), victim.segment_seq, at, &[flipped]);
        match Wal::open(dir.path(), opts()) {
            Err(Error::Corrupted { path, offset, .. }) => {
                assert_eq!(path, seg);
                assert_eq!(offset, victim.offset);
            }
            Err(e) => panic!("byte {byte}: wrong error {e}"),
            Ok(_) => panic!("byte {byte}: corruption was not detected"),
        }
        // Undo, and the WAL opens again with everything.
        patch(dir.path(), victim.segment_seq, at, &[data[at as usize]]);
        assert_eq!(Wal::open(dir.path(), opts()).unwrap().1.records.len(), 9);
    }
}

#[test]
fn zeroed_record_before_good_ones_is_corruption_not_a_tail() {
    let dir = tempfile::tempdir().unwrap();
    let pos = write_records(dir.path(), 6);
    let victim = pos[2];
    patch(
        dir.path(),
        victim.segment_seq,
        victim.offset,
        &vec![0u8; victim.len_bytes as usize],
    );
    assert!(matches!(
        Wal::open(dir.path(), opts()),
        Err(Error::Corrupted { .. })
    ));
}

#[test]
fn lost_record_at_a_segment_end_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let pos = write_records(dir.path(), 400);
    // The last record of the first segment vanishes (zeroed): the next segment's first
    // record no longer continues the sequence.
    let last_of_first = pos
        .iter()
        .rfind(|p| p.segment_seq == pos[0].segment_seq)
        .unwrap();
    assert!(pos
        .iter()
        .any(|p| p.segment_seq > last_of_first.segment_seq));
    patch(
        dir.path(),
        last_of_first.segment_seq,
        last_of_first.offset,
        &vec![0u8; last_of_first.len_bytes as usize],
    );
    let err = Wal::open(dir.path(), opts()).err().expect("must fail");
    assert!(matches!(err, Error::Corrupted { .. }), "{err}");
}
