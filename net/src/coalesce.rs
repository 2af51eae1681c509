//! The client connection's write side, shaped for `h2`'s encoder.
//!
//! `h2` copies a DATA payload into its write buffer only below a threshold: 256 bytes when the
//! transport writes vectored, 1 KiB when it does not. A larger payload is kept aside and ends
//! the buffer: the next frame (the answer's own trailers, another stream's answer) waits for a
//! flush, and goes in a write of its own. Most etcd answers are a few hundred bytes, so with
//! vectored writes a unary answer took two syscalls, and answers to many streams could not
//! share one.
//!
//! So this transport says it does not write vectored (1 KiB threshold: small answers and their
//! trailers share `h2`'s buffer, one write for all of them). Then `h2` writes a large frame
//! as two `poll_write`s, its buffer (ending with the frame's 9-byte head) and the payload; a
//! short first part is held here and goes out with the payload in one writev, so a large
//! answer costs no more syscalls than before. Whatever is held is written on flush.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes up to this long are held for the next one (h2's buffer before a large payload: the
/// frame head and whatever small frames came before it).
const HOLD_BYTES_MAX: usize = 4096;

pub struct Coalesce<S> {
    inner: S,
    /// Accepted from the caller, not yet written.
    held: Vec<u8>,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Coalesce {
            inner,
            held: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes what is held; Ready once nothing is.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() + buf.len() <= HOLD_BYTES_MAX {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        loop {
            let held = this.held.len();
            let bufs = [io::IoSlice::new(&this.held), io::IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > held {
                this.held.clear();
                return Poll::Ready(Ok(n - held));
            }
            // Only (part of) what was held went: nothing of `buf` is taken yet.
            this.held.drain(..n);
            if this.held.is_empty() {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that records each write call and takes at most `limit` bytes a call.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len().min(self.limit);
            self.writes.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorder(limit: usize) -> Coalesce<Recorder> {
        Coalesce::new(Recorder {
            writes: Vec::new(),
            limit,
        })
    }

    /// A frame head and its large payload go in one write; small writes wait for a flush;
    /// every byte arrives once, in order.
    #[tokio::test]
    async fn a_short_write_goes_out_with_the_next_or_on_flush() {
        let mut c = recorder(usize::MAX);
        let head = [9u8; 9];
        let payload = vec![7u8; 16 * 1024];
        c.write_all(&head).await.unwrap();
        assert!(c.get_ref().writes.is_empty(), "a short write is held");
        c.write_all(&payload).await.unwrap();
        assert_eq!(c.get_ref().writes.len(), 1, "head and payload in one write");
        assert_eq!(c.get_ref().writes[0], [&head[..], &payload[..]].concat());

        c.write_all(b"trailers").await.unwrap();
        assert_eq!(c.get_ref().writes.len(), 1);
        c.flush().await.unwrap();
        assert_eq!(c.get_ref().writes.len(), 2, "flush writes what is held");
        assert_eq!(c.get_ref().writes[1], b"trailers");
    }

    /// A socket that takes a little at a time still gets every byte once, in order.
    #[tokio::test]
    async fn partial_writes_keep_the_bytes_in_order() {
        let mut c = recorder(5);
        let mut sent = Vec::new();
        for i in 0..20u8 {
            let part = vec![i; if i % 3 == 0 { 6000 } else { 7 }];
            c.write_all(&part).await.unwrap();
            sent.extend_from_slice(&part);
        }
        c.flush().await.unwrap();
        let got: Vec<u8> = c.get_ref().writes.concat();
        assert_eq!(got, sent);
    }
}
