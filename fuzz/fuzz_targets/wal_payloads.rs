//! The decoders of what the WAL and the backend hold, on arbitrary bytes: a batch of raft
//! entries with its hard state, the member meta record, an MVCC record. (The WAL's framing is
//! CRC-checked before these run; a bug here would still be a crash on recovery.)
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = keel_storage::raftlog::decode_batch(data);
    let _ = keel_storage::raftlog::decode_meta(data);
    let _ = keel_storage::mvcc::decode_record(data);
});
