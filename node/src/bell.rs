//! How the raft core is woken when it waits on its peers' sockets as well as its channels.
//!
//! While the raft core has peer links of its own (`peer::Adopted`) it parks in `mio::Poll`
//! (epoll) instead of on its channels. Every sender to it goes through `Tx`, which sends and
//! then rings the bell: the ring costs an eventfd write only when the raft core is parked,
//! and one atomic load otherwise.
//!
//! The raft core raises `parked`, then looks at its channels, then polls; a sender pushes,
//! then looks at `parked`. Both sides put a SeqCst fence between their store and their load,
//! so one of them always sees the other: a message is never left waiting for a poll timeout.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{SendError, SendTimeoutError, Sender, TrySendError};

pub struct Bell {
    parked: AtomicBool,
    waker: mio::Waker,
}

/// The token of the bell's own events in the raft core's poll.
pub const BELL: mio::Token = mio::Token(0);

impl Bell {
    /// A bell for `poll` (its events carry `BELL`).
    pub fn new(poll: &mio::Poll) -> std::io::Result<Arc<Bell>> {
        Ok(Arc::new(Bell {
            parked: AtomicBool::new(false),
            waker: mio::Waker::new(poll.registry(), BELL)?,
        }))
    }

    /// Called by the raft core before it looks at its channels a last time and polls.
    pub fn park(&self) {
        self.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Called by the raft core once its poll returned.
    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::SeqCst) {
            // Fails only if the eventfd cannot be written, which mio handles by draining it.
            let _ = self.waker.wake();
        }
    }
}

/// A sender to the raft core: a crossbeam sender that rings the raft core's bell.
pub struct Tx<T> {
    inner: Sender<T>,
    bell: Arc<Bell>,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Tx {
            inner: self.inner.clone(),
            bell: self.bell.clone(),
        }
    }
}

impl<T> Tx<T> {
    pub fn new(inner: Sender<T>, bell: Arc<Bell>) -> Tx<T> {
        Tx { inner, bell }
    }

    /// Sends, waiting for room (as crossbeam's `send`).
    pub fn send(&self, v: T) -> Result<(), SendError<T>> {
        self.inner.send(v)?;
        self.bell.ring();
        Ok(())
    }

    /// Sends, waiting at most `wait` for room (as crossbeam's `send_timeout`).
    pub fn send_timeout(&self, v: T, wait: std::time::Duration) -> Result<(), SendTimeoutError<T>> {
        self.inner.send_timeout(v, wait)?;
        self.bell.ring();
        Ok(())
    }

    /// Sends if there is room (as crossbeam's `try_send`).
    pub fn try_send(&self, v: T) -> Result<(), TrySendError<T>> {
        self.inner.try_send(v)?;
        self.bell.ring();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A parked poller is woken by a send; one that is not parked gets no event (no write).
    #[test]
    fn a_send_wakes_a_parked_poller_only() {
        let mut poll = mio::Poll::new().unwrap();
        let bell = Bell::new(&poll).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(4);
        let tx = Tx::new(tx, bell.clone());
        let mut events = mio::Events::with_capacity(4);

        // Not parked: the send rings nothing, so a poll times out.
        tx.send(1).unwrap();
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(events.is_empty(), "no wake-up while not parked");
        assert_eq!(rx.try_recv(), Ok(1));

        // Parked: a send from another thread ends the poll long before its timeout.
        bell.park();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.try_send(2).unwrap();
        });
        let t = Instant::now();
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        bell.unpark();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(events.iter().any(|e| e.token() == BELL));
        assert_eq!(rx.try_recv(), Ok(2));
        sender.join().unwrap();
    }
}
