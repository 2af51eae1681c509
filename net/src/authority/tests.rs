use super::*;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

const END: u8 = FLAG_END_HEADERS | FLAG_END_STREAM;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn string(out: &mut Vec<u8>, s: &str, huffman: bool) {
    if huffman {
        let mut h = Vec::new();
        httlib_huffman::encode(s.as_bytes(), &mut h).unwrap();
        encode_int(out, 0x80, 7, h.len());
        out.extend_from_slice(&h);
    } else {
        encode_int(out, 0x00, 7, s.len());
        out.extend_from_slice(s.as_bytes());
    }
}

/// Literal with incremental indexing, name by index.
fn lit_indexed(out: &mut Vec<u8>, name_idx: usize, value: &str, huffman: bool) {
    encode_int(out, 0x40, 6, name_idx);
    string(out, value, huffman);
}

/// Literal with incremental indexing, literal name.
fn lit_named(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x40);
    string(out, name, true);
    string(out, value, false);
}

/// Literal without indexing, name by index.
fn lit_plain(out: &mut Vec<u8>, name_idx: usize, value: &str, huffman: bool) {
    encode_int(out, 0x00, 4, name_idx);
    string(out, value, huffman);
}

fn indexed(out: &mut Vec<u8>, idx: usize) {
    encode_int(out, 0x80, 7, idx);
}

/// POST + http, then `rest`.
fn request(rest: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    rest(&mut b);
    b
}

/// A client's bytes: six requests whose authorities exercise every path (see `expected`).
fn client_bytes() -> Vec<u8> {
    let mut c = PREFACE.to_vec();
    c.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                     // 1: path and a bad authority, both inserted into the table (62 = authority, 63 = path).
    let b = request(|b| {
        lit_indexed(b, 4, "/etcdserverpb.Maintenance/Status", false);
        lit_indexed(b, 1, "http://127.0.0.1:2379", false);
    });
    c.extend(frame(TYPE_HEADERS, END, 1, &b));
    // 3: both by reference: h2's entry 62 holds the repaired value.
    let b = request(|b| {
        indexed(b, 63);
        indexed(b, 62);
    });
    c.extend(frame(TYPE_HEADERS, END, 3, &b));
    // 5: padded + priority HEADERS and a CONTINUATION; a Huffman-coded bad authority
    // without indexing.
    let b = request(|b| {
        indexed(b, 63);
        lit_plain(b, 1, "https://localhost:2379/x?y", true);
    });
    let (head, tail) = b.split_at(3);
    let mut p = vec![4u8]; // pad length
    p.extend_from_slice(&[0, 0, 0, 0, 16]); // priority: stream 0, weight 16
    p.extend_from_slice(head);
    p.extend_from_slice(&[0; 4]);
    c.extend(frame(
        TYPE_HEADERS,
        FLAG_END_STREAM | FLAG_PADDED | FLAG_PRIORITY,
        5,
        &p,
    ));
    c.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, tail));
    // 7: a good authority under a literal name, inserted (62 now; the old one is 64).
    let b = request(|b| {
        indexed(b, 63);
        lit_named(b, ":authority", "localhost:1");
    });
    c.extend(frame(TYPE_HEADERS, END, 7, &b));
    // 9 and 11: references to the good entry (62) and to the repaired one (63); the path
    // is 64 now.
    for (stream, idx) in [(9, 62), (11, 63)] {
        let b = request(|b| {
            indexed(b, 64);
            indexed(b, idx);
        });
        c.extend(frame(TYPE_HEADERS, END, stream, &b));
    }
    c
}

/// Serves `io` with h2 and returns the authority of every request it accepted.
async fn accepted_authorities<S>(io: S) -> Vec<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h2::server::handshake(io).await.unwrap();
    let mut got = Vec::new();
    // The client stays connected; the last request is long in by the time this times out.
    let wait = std::time::Duration::from_millis(500);
    while let Ok(Some(r)) = tokio::time::timeout(wait, conn.accept()).await {
        let (req, mut respond) = r.expect("no connection error");
        got.push(
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        );
        let _ = respond.send_response(http::Response::new(()), true);
    }
    got
}

async fn run(bytes: Vec<u8>, fix: bool) -> Vec<String> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(&bytes).await.unwrap();
    let got = if fix {
        accepted_authorities(AuthorityFix::new(server)).await
    } else {
        accepted_authorities(server).await
    };
    drop(client);
    got
}

#[tokio::test]
async fn h2_accepts_every_request_once_authorities_are_repaired() {
    let got = run(client_bytes(), true).await;
    assert_eq!(
        got,
        [
            "127.0.0.1:2379",
            "127.0.0.1:2379",
            "localhost:2379",
            "localhost:1",
            "localhost:1",
            "127.0.0.1:2379"
        ]
    );
}

#[tokio::test]
async fn without_the_repair_h2_refuses_the_url_authorities() {
    // The control for the test above: the same bytes straight into h2.
    let got = run(client_bytes(), false).await;
    assert_eq!(got, ["localhost:1", "localhost:1"]);
}

#[tokio::test]
async fn blocks_without_a_bad_authority_and_other_frames_pass_byte_for_byte() {
    let mut c = PREFACE.to_vec();
    c.extend(frame(0x4, 0, 0, &[0, 4, 0, 1, 0, 0])); // SETTINGS
    let b = request(|b| {
        lit_indexed(b, 4, "/etcdserverpb.KV/Put", true);
        lit_indexed(b, 1, "127.0.0.1:2379", true);
        lit_named(b, "te", "trailers");
    });
    c.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    for chunk in data.chunks(16 * 1024) {
        c.extend(frame(0x0, 0, 1, chunk));
    }
    c.extend(frame(0x0, FLAG_END_STREAM, 1, &[]));
    c.extend(frame(0x8, 0, 0, &[0, 1, 0, 0])); // WINDOW_UPDATE
    assert_eq!(through(&c[..]).await, c);
}

#[tokio::test]
async fn a_stream_that_is_not_http2_passes_unchanged() {
    let c = b"GET /health HTTP/1.1\r\nHost: http://x\r\n\r\n".to_vec();
    assert_eq!(through(&c[..]).await, c);
}

#[tokio::test]
async fn a_malformed_block_stops_examining_and_passes_through() {
    let mut c = PREFACE.to_vec();
    // Index 70 does not exist in an empty table: h2 will say so, not us.
    c.extend(frame(TYPE_HEADERS, END, 1, &[0x83, 0x86, 0x80 | 70]));
    let b = request(|b| lit_indexed(b, 1, "http://x:1", false));
    c.extend(frame(TYPE_HEADERS, END, 3, &b));
    assert_eq!(through(&c[..]).await, c);
}

#[test]
fn repair_takes_the_authority_of_a_url_and_never_grows() {
    assert_eq!(repair(b"http://127.0.0.1:2379"), b"127.0.0.1:2379");
    assert_eq!(repair(b"https://a.example:1/x?y#z"), b"a.example:1");
    assert_eq!(repair(b"unix:///run/etcd.sock"), b"localhost");
    assert_eq!(repair(b"a b"), b"x");
    for v in [
        &b"http://h:1"[..],
        b"h h",
        b"unix:///x",
        b"https://[::1]:2379/",
    ] {
        let r = repair(v);
        assert!(r.len() <= v.len() && usable(&r), "{v:?} -> {r:?}");
    }
}

#[test]
fn mirror_evicts_as_the_client_encoder_does() {
    let mut m = HpackMirror::new();
    let mut b = Vec::new();
    encode_int(&mut b, 0x20, 5, 100); // table size update: 100 bytes
    lit_indexed(&mut b, 1, "http://a:1", false); // 10 + 10 + 32 = 52
    lit_indexed(&mut b, 4, "/x", false); // 5 + 2 + 32 = 39
    let splices = m.scan(&b).unwrap();
    assert_eq!(splices.len(), 1);
    assert_eq!(splices[0].value, b"a:1");
    assert_eq!(m.size, 91);
    let mut b = Vec::new();
    lit_named(&mut b, "content-type", "application/grpc"); // 12 + 16 + 32 = 60: evicts 52
    m.scan(&b).unwrap();
    assert_eq!((m.entries.len(), m.size), (2, 99));
    assert!(m.scan(&[0x80 | 64]).is_err(), "the authority entry is gone");
    assert_eq!(m.scan(&[0x80 | 63]).unwrap(), []);
    // A literal whose name is a dynamic entry named :authority is found too.
    let mut m = HpackMirror::new();
    let mut b = Vec::new();
    lit_indexed(&mut b, 1, "good:1", false);
    lit_indexed(&mut b, 62, "http://bad:2", true);
    let splices = m.scan(&b).unwrap();
    assert_eq!(splices.len(), 1);
    assert_eq!(splices[0].value, b"bad:2");
    // An entry larger than the table empties it.
    let mut b = Vec::new();
    encode_int(&mut b, 0x20, 5, 40);
    lit_indexed(&mut b, 1, "0123456789", false);
    m.scan(&b).unwrap();
    assert_eq!((m.entries.len(), m.size), (0, 0));
}

#[test]
fn integers_round_trip_and_overflow_is_an_error() {
    for prefix in [4u8, 5, 6, 7] {
        for v in [
            0usize,
            1,
            14,
            15,
            30,
            31,
            62,
            63,
            126,
            127,
            128,
            1337,
            1 << 20,
        ] {
            let mut b = Vec::new();
            encode_int(&mut b, 0, prefix, v);
            assert_eq!(decode_int(&b, 0, prefix).unwrap(), (v, b.len()));
        }
    }
    assert!(decode_int(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 0, 7).is_err());
    assert!(decode_int(&[0x7f, 0x80], 0, 7).is_err(), "cut short");
}

/// Yields one byte per read, to cut every frame and the preface at every point.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some((first, rest)) = self.0.split_first() {
            buf.put_slice(&[*first]);
            self.0 = rest;
        }
        Poll::Ready(Ok(()))
    }
}

async fn through(input: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    AuthorityFix::new(input)
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn byte_by_byte_reads_give_the_same_stream() {
    let c = client_bytes();
    let whole = through(&c[..]).await;
    assert_ne!(whole, c, "the sample has authorities to repair");
    assert_eq!(through(Trickle(&c)).await, whole);
}

#[tokio::test]
async fn malformed_frames_floods_and_empty_authorities_reach_h2_as_sent() {
    let mut bad_pad = PREFACE.to_vec();
    bad_pad.extend(frame(TYPE_HEADERS, END | FLAG_PADDED, 1, &[9, 0x83]));
    bad_pad.extend(frame(TYPE_HEADERS, END, 3, &request(|_| {})));
    let mut flood = PREFACE.to_vec();
    flood.extend(frame(TYPE_HEADERS, 0, 1, &[0x83]));
    for _ in 0..40 {
        flood.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
    }
    let b = request(|b| lit_indexed(b, 1, "http://x:1", false));
    flood.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &b));
    let mut empty = PREFACE.to_vec();
    let b = request(|b| lit_indexed(b, 1, "", false));
    empty.extend(frame(TYPE_HEADERS, END, 1, &b));
    for c in [bad_pad, flood, empty] {
        assert_eq!(through(&c[..]).await, c);
    }
}

/// Fuzz smoke: random header blocks and random byte streams never panic the layer, and a
/// stream with nothing to repair comes out unchanged (`KEEL_FUZZ_ITERS`).
#[tokio::test]
async fn random_blocks_and_streams_never_panic() {
    use rand::{Rng, SeedableRng};
    let iters: usize = std::env::var("KEEL_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4a7b);
    for _ in 0..iters {
        let block: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
        let _ = HpackMirror::new().scan(&block);
        let mut c = PREFACE.to_vec();
        c.extend(frame(TYPE_HEADERS, END, 1, &block));
        let out = through(&c[..]).await;
        if HpackMirror::new().scan(&block).map(|s| s.is_empty()) != Ok(false) {
            assert_eq!(out, c, "nothing to repair: unchanged");
        }
        let tail: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
        c.extend(tail);
        let _ = through(&c[..]).await;
    }
}
