//! Repairs the HTTP/2 `:authority` that some etcd clients send, before the `h2` crate sees it.
//!
//! etcdctl 3.4 (grpc-go) dials several calls (`endpoint status`, `endpoint hashkv`, `defrag`)
//! with the whole endpoint URL as `:authority` (`http://127.0.0.1:2379`). Go's gRPC server
//! accepts anything there; `h2` parses it as a URI authority and resets the stream with
//! PROTOCOL_ERROR, with no option to relax that. Keel never routes on the authority, so this
//! layer sits between the socket and `h2` and rewrites only what `h2` would refuse.
//!
//! # What it does to the client's bytes
//! It parses the HTTP/2 frame layer of the client-to-server direction. Every frame other than
//! HEADERS/CONTINUATION passes through untouched (large DATA payloads are read straight into
//! `h2`'s buffer). A header block (HEADERS + CONTINUATIONs) is held until it is complete and
//! scanned with a mirror of the client's HPACK dynamic table:
//! - no unusable `:authority`: the original frames go on byte for byte;
//! - otherwise the literal value strings of the bad `:authority` fields are replaced in place
//!   by a plain (non-Huffman) string of the repaired authority, every other byte of the block
//!   is kept, and the block goes on as one HEADERS frame (+ CONTINUATIONs if over 16 KiB).
//!
//! # Why h2's HPACK table stays valid
//! Representations are never changed: an entry the client inserts is inserted by `h2` too, in
//! the same order, only with a shorter value when it was repaired. So for every position the
//! client can still reference, `h2`'s table holds the same entry (or its repaired value), and
//! since `h2`'s entries are never larger, `h2` evicts no entry the client still has. An
//! indexed reference to a repaired entry needs no rewrite: `h2` resolves it to the good value.
//!
//! Anything unexpected (not HTTP/2, bad framing, a block that does not decode, a block over
//! `BLOCK_BYTES_MAX`) switches the connection to plain pass-through: `h2` then sees exactly
//! what the client sent and answers as it would have without this layer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD_BYTES: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame payload `h2` accepts unless told otherwise (SETTINGS_MAX_FRAME_SIZE's
/// initial value; Keel's server does not raise it).
const FRAME_PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// The largest header block this layer holds back; a larger one switches to pass-through.
const BLOCK_BYTES_MAX: usize = 256 * 1024;
/// The most frames one held block may span (h2 allows a handful of CONTINUATIONs).
const BLOCK_FRAMES_MAX: usize = 16;
/// How much is read from the socket at a time when frames must be examined.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE's initial value, which `h2`'s server keeps.
const HEADER_TABLE_BYTES_DEFAULT: usize = 4096;

/// Whether `h2` takes `value` as an `:authority`.
fn usable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The authority to put in place of an unusable one: the authority part of a URL, else a
/// stand-in. Never longer than `value`, but for the empty value (which is not repaired).
pub fn repair(value: &[u8]) -> Vec<u8> {
    let rest = match value.windows(3).position(|w| w == b"://") {
        Some(i) => &value[i + 3..],
        None => value,
    };
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let host = &rest[..end];
    if usable(host) {
        return host.to_vec();
    }
    if value.len() >= b"localhost".len() {
        b"localhost".to_vec()
    } else {
        b"x".to_vec()
    }
}

/// An HTTP/2 server-side stream with `:authority` repair on what the client sends.
pub struct AuthorityFix<S> {
    inner: S,
    /// Read from the client, not yet examined.
    raw: BytesMut,
    /// Examined, ready for `h2`.
    out: BytesMut,
    state: State,
    hpack: HpackMirror,
    block: Block,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// This many bytes of the client preface matched so far.
    Preface(usize),
    /// At a frame header.
    Head,
    /// Inside a frame that passes through; this many payload bytes left.
    Pass(usize),
    /// Not examined any more.
    Raw,
}

/// A header block being collected.
#[derive(Default)]
struct Block {
    active: bool,
    stream_id: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The frames as received, sent on unchanged when nothing needs repair.
    frames: BytesMut,
    /// The HPACK fragment (frames' payloads without padding and priority).
    fragment: Vec<u8>,
    frame_count: usize,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            state: State::Preface(0),
            hpack: HpackMirror::new(),
            block: Block::default(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be examined from `raw` to `out`.
    fn process(&mut self) {
        loop {
            match self.state {
                State::Raw => {
                    let all = self.raw.split();
                    self.out.unsplit(all);
                    return;
                }
                State::Preface(n) => {
                    let take = (PREFACE.len() - n).min(self.raw.len());
                    if take == 0 {
                        return;
                    }
                    if self.raw[..take] != PREFACE[n..n + take] {
                        self.state = State::Raw;
                        continue;
                    }
                    let head = self.raw.split_to(take);
                    self.out.unsplit(head);
                    self.state = if n + take == PREFACE.len() {
                        State::Head
                    } else {
                        State::Preface(n + take)
                    };
                }
                State::Pass(0) => self.state = State::Head,
                State::Pass(left) => {
                    let take = left.min(self.raw.len());
                    if take == 0 {
                        return;
                    }
                    let part = self.raw.split_to(take);
                    self.out.unsplit(part);
                    self.state = State::Pass(left - take);
                }
                State::Head => {
                    if self.raw.len() < FRAME_HEAD_BYTES {
                        return;
                    }
                    let h = &self.raw[..FRAME_HEAD_BYTES];
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let kind = h[3];
                    let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if self.block.active {
                        if kind != TYPE_CONTINUATION || stream_id != self.block.stream_id {
                            // An interrupted block: a protocol error for h2 to report.
                            self.give_up();
                            continue;
                        }
                    } else if kind != TYPE_HEADERS {
                        let head = self.raw.split_to(FRAME_HEAD_BYTES);
                        self.out.unsplit(head);
                        self.state = State::Pass(len);
                        continue;
                    }
                    // h2 refuses frames over its maximum and floods of CONTINUATIONs:
                    // leave those to it, untouched.
                    let held = self.block.frames.len() + FRAME_HEAD_BYTES + len;
                    if len > FRAME_PAYLOAD_BYTES_MAX
                        || held > BLOCK_BYTES_MAX
                        || self.block.frame_count >= BLOCK_FRAMES_MAX
                    {
                        self.give_up();
                        continue;
                    }
                    if self.raw.len() < FRAME_HEAD_BYTES + len {
                        return;
                    }
                    let frame = self.raw.split_to(FRAME_HEAD_BYTES + len);
                    if !self.add_frame(frame) {
                        self.give_up();
                    }
                }
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the block; finishes the block at END_HEADERS.
    /// False when the frame is malformed.
    fn add_frame(&mut self, frame: BytesMut) -> bool {
        let kind = frame[3];
        let flags = frame[4];
        let fragment = if kind == TYPE_HEADERS {
            self.block.active = true;
            self.block.stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            self.block.end_stream = flags & FLAG_END_STREAM != 0;
            headers_fragment(&frame, flags).map(|(range, priority)| {
                self.block.priority = priority;
                range
            })
        } else {
            Some(FRAME_HEAD_BYTES..frame.len())
        };
        let Some(range) = fragment else {
            // Malformed: it goes on as received (with what is held) for h2 to refuse.
            self.block.frames.unsplit(frame);
            return false;
        };
        self.block.fragment.extend_from_slice(&frame[range]);
        self.block.frames.unsplit(frame);
        self.block.frame_count += 1;
        if flags & FLAG_END_HEADERS != 0 {
            return self.finish_block();
        }
        true
    }

    fn finish_block(&mut self) -> bool {
        let block = std::mem::take(&mut self.block);
        let splices = match self.hpack.scan(&block.fragment) {
            Ok(s) => s,
            Err(_) => {
                self.block = block;
                return false;
            }
        };
        if splices.is_empty() {
            self.out.unsplit(block.frames);
            return true;
        }
        let fragment = apply_splices(&block.fragment, &splices);
        write_header_frames(&mut self.out, &block, &fragment);
        true
    }

    /// Stops examining: what is held goes on as received.
    fn give_up(&mut self) {
        let block = std::mem::take(&mut self.block);
        self.out.unsplit(block.frames);
        self.state = State::Raw;
    }
}

/// Where a HEADERS frame's HPACK fragment lies (past padding and priority), and its priority
/// fields; None when the padding or priority does not fit the frame.
fn headers_fragment(frame: &[u8], flags: u8) -> Option<(std::ops::Range<usize>, Option<[u8; 5]>)> {
    let (mut start, mut end) = (FRAME_HEAD_BYTES, frame.len());
    if flags & FLAG_PADDED != 0 {
        let pad = *frame.get(start)? as usize;
        start += 1;
        end = end.checked_sub(pad).filter(|e| *e >= start)?;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        priority = Some(
            frame
                .get(start..start + 5)
                .filter(|_| start + 5 <= end)?
                .try_into()
                .ok()?,
        );
        start += 5;
    }
    Some((start..end, priority))
}

/// A replacement of `block[start..end]` (an encoded string) by `value` as a plain string.
#[derive(Debug, PartialEq, Eq)]
struct Splice {
    start: usize,
    end: usize,
    value: Vec<u8>,
}

fn apply_splices(fragment: &[u8], splices: &[Splice]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fragment.len());
    let mut at = 0;
    for s in splices {
        out.extend_from_slice(&fragment[at..s.start]);
        encode_int(&mut out, 0x00, 7, s.value.len());
        out.extend_from_slice(&s.value);
        at = s.end;
    }
    out.extend_from_slice(&fragment[at..]);
    out
}

/// One HEADERS frame for the block, with CONTINUATIONs if it does not fit in one frame.
fn write_header_frames(out: &mut BytesMut, block: &Block, fragment: &[u8]) {
    let mut first = true;
    let mut rest = fragment;
    loop {
        let prio_len = if first && block.priority.is_some() {
            5
        } else {
            0
        };
        let take = rest.len().min(FRAME_PAYLOAD_BYTES_MAX - prio_len);
        let (chunk, after) = rest.split_at(take);
        let mut flags = if after.is_empty() {
            FLAG_END_HEADERS
        } else {
            0
        };
        let kind = if first {
            if block.end_stream {
                flags |= FLAG_END_STREAM;
            }
            if prio_len > 0 {
                flags |= FLAG_PRIORITY;
            }
            TYPE_HEADERS
        } else {
            TYPE_CONTINUATION
        };
        let len = (chunk.len() + prio_len) as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&block.stream_id.to_be_bytes());
        if let (true, Some(p)) = (prio_len > 0, block.priority) {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(chunk);
        if after.is_empty() {
            return;
        }
        rest = after;
        first = false;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.raw.is_empty() {
                match this.state {
                    State::Raw => return Pin::new(&mut this.inner).poll_read(cx, buf),
                    State::Pass(left) if left > 0 => {
                        // Payload that passes through goes straight into h2's buffer.
                        let limit = left.min(buf.remaining());
                        let mut part = buf.take(limit);
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                        let n = part.filled().len();
                        // SAFETY: `part` initialised these n bytes of buf's unfilled region.
                        unsafe { buf.assume_init(n) };
                        buf.advance(n);
                        this.state = State::Pass(left - n);
                        return Poll::Ready(Ok(()));
                    }
                    _ => {}
                }
            } else {
                this.process();
                if !this.out.is_empty() {
                    continue;
                }
            }
            this.raw.reserve(READ_CHUNK_BYTES);
            let spare = this.raw.spare_capacity_mut();
            let mut rb = ReadBuf::uninit(spare);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // End of stream: whatever is held goes on, h2 reports what is cut short.
                this.give_up();
                let rest = this.raw.split();
                this.out.unsplit(rest);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // SAFETY: the read initialised n bytes of the spare capacity.
            unsafe { this.raw.set_len(this.raw.len() + n) };
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// RFC 7541 Appendix A: the static table's names, index 1 first.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// RFC 7541 §4.1: an entry's size is its name and value lengths plus 32.
const ENTRY_OVERHEAD_BYTES: usize = 32;

#[derive(Debug, PartialEq, Eq)]
pub struct HpackError(&'static str);

/// One dynamic-table entry as the client's encoder holds it; only what naming needs.
#[derive(Clone, Copy, Debug)]
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// The client's HPACK dynamic table, as far as finding `:authority` fields needs.
struct HpackMirror {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    scratch: Vec<u8>,
}

impl HpackMirror {
    fn new() -> Self {
        HpackMirror {
            entries: VecDeque::new(),
            size: 0,
            max_size: HEADER_TABLE_BYTES_DEFAULT,
            scratch: Vec::new(),
        }
    }

    /// (is `:authority`, name length) of the entry at HPACK index `idx`.
    fn name_at(&self, idx: usize) -> Result<(bool, usize), HpackError> {
        match idx {
            0 => Err(HpackError("index 0")),
            1..=61 => Ok((idx == 1, STATIC_NAMES[idx - 1].len())),
            _ => self
                .entries
                .get(idx - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(HpackError("index past the dynamic table")),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let e = self.entries.pop_back().expect("size > 0 means entries");
            self.size -= e.size;
        }
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - e.size);
        self.size += e.size;
        self.entries.push_front(e);
    }

    /// Walks one header block, updating the table as the client's encoder did, and returns
    /// the value strings of unusable `:authority` fields with their repairs.
    fn scan(&mut self, block: &[u8]) -> Result<Vec<Splice>, HpackError> {
        let mut splices = Vec::new();
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let (idx, next) = decode_int(block, pos, 7)?;
                self.name_at(idx)?;
                pos = next;
                continue;
            }
            if b & 0xe0 == 0x20 {
                let (max, next) = decode_int(block, pos, 5)?;
                if max > HEADER_TABLE_BYTES_DEFAULT {
                    return Err(HpackError("table size update over the limit"));
                }
                self.max_size = max;
                self.evict_to(max);
                pos = next;
                continue;
            }
            let (indexing, prefix) = if b & 0xc0 == 0x40 {
                (true, 6)
            } else {
                (false, 4)
            };
            let (idx, next) = decode_int(block, pos, prefix)?;
            pos = next;
            let (authority, name_len) = if idx == 0 {
                let (end, name) = self.decode_string(block, pos)?;
                pos = end;
                (name == b":authority", name.len())
            } else {
                self.name_at(idx)?
            };
            let start = pos;
            if !indexing && !authority {
                // Nothing to learn from this value: skip it undecoded.
                pos = skip_string(block, pos)?;
                continue;
            }
            let (end, value) = self.decode_string(block, pos)?;
            pos = end;
            let value_len = value.len();
            if authority && !usable(value) {
                // A repair never grows an entry (see the module note); the empty authority,
                // the one value that has no shorter usable form, is left for h2 to refuse.
                let repaired = repair(value);
                if repaired.len() <= value_len {
                    splices.push(Splice {
                        start,
                        end,
                        value: repaired,
                    });
                }
            }
            if indexing {
                self.insert(Entry {
                    authority,
                    name_len,
                    size: name_len + value_len + ENTRY_OVERHEAD_BYTES,
                });
            }
        }
        Ok(splices)
    }

    /// Decodes the string at `pos`; returns where it ends and its bytes.
    fn decode_string<'a>(
        &'a mut self,
        block: &'a [u8],
        pos: usize,
    ) -> Result<(usize, &'a [u8]), HpackError> {
        let huffman = block.get(pos).ok_or(HpackError("string past the block"))? & 0x80 != 0;
        let (len, start) = decode_int(block, pos, 7)?;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= block.len())
            .ok_or(HpackError("string past the block"))?;
        let raw = &block[start..end];
        if !huffman {
            return Ok((end, raw));
        }
        self.scratch.clear();
        httlib_huffman::decode(
            raw,
            &mut self.scratch,
            httlib_huffman::DecoderSpeed::FourBits,
        )
        .map_err(|_| HpackError("bad huffman string"))?;
        Ok((end, &self.scratch))
    }
}

/// Where the string at `pos` ends, without decoding it.
fn skip_string(block: &[u8], pos: usize) -> Result<usize, HpackError> {
    let (len, start) = decode_int(block, pos, 7)?;
    start
        .checked_add(len)
        .filter(|e| *e <= block.len())
        .ok_or(HpackError("string past the block"))
}

/// RFC 7541 §5.1 integer with an N-bit prefix at `pos`; returns it and the next position.
fn decode_int(block: &[u8], pos: usize, prefix_bits: u8) -> Result<(usize, usize), HpackError> {
    let mask = (1usize << prefix_bits) - 1;
    let first = *block.get(pos).ok_or(HpackError("integer past the block"))? as usize & mask;
    if first < mask {
        return Ok((first, pos + 1));
    }
    let mut value = mask;
    let mut shift = 0;
    let mut at = pos + 1;
    loop {
        let b = *block.get(at).ok_or(HpackError("integer past the block"))?;
        at += 1;
        if shift > 28 {
            return Err(HpackError("integer too large"));
        }
        value = ((b & 0x7f) as usize)
            .checked_shl(shift)
            .and_then(|v| v.checked_add(value))
            .ok_or(HpackError("integer too large"))?;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, at));
        }
    }
}

fn encode_int(out: &mut Vec<u8>, high_bits: u8, prefix_bits: u8, value: usize) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        out.push(high_bits | value as u8);
        return;
    }
    out.push(high_bits | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests;
