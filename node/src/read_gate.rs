//! Linearizable reads on a net core share ReadIndex rounds: one round is in flight per net
//! core at a time (etcd's linearizable read loop does the same per member). Reads that come
//! while it is out wait for the next, which is asked for all of them at once.
//!
//! Asked one by one, every read cost a message to the raft core and one back, two thread
//! wake-ups, and (unless the raft core happened to batch them) a round of heartbeats to every
//! follower. Now a round costs that once, however many reads it serves.

use std::cell::RefCell;

use keel_net::ApiError;
use tokio::sync::{mpsc, oneshot};

use crate::bell::Tx;
use crate::raft_core::{Control, Reader};

thread_local! {
    /// This thread's read loops, by the backend they serve (its raft status's address).
    static LOOPS: RefCell<Vec<(usize, mpsc::UnboundedSender<Reader>)>> =
        const { RefCell::new(Vec::new()) };
}

/// Joins the next ReadIndex round of the calling net core for the backend `key` (its read loop
/// starts on first use). Outside a tokio runtime, the read asks a round of its own.
pub fn join(
    key: usize,
    control: &Tx<Control>,
) -> Result<oneshot::Receiver<Result<(), ApiError>>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        ask(control, tx)?;
        return Ok(rx);
    };
    LOOPS.with(|loops| {
        let mut loops = loops.borrow_mut();
        let mut reader = tx;
        if let Some(i) = loops.iter().position(|(k, _)| *k == key) {
            match loops[i].1.send(reader) {
                Ok(()) => return,
                // Its loop ended with the runtime it ran on: start another.
                Err(mpsc::error::SendError(r)) => {
                    reader = r;
                    loops.swap_remove(i);
                }
            }
        }
        let (loop_tx, loop_rx) = mpsc::unbounded_channel();
        let _ = loop_tx.send(reader);
        rt.spawn(read_loop(loop_rx, control.clone()));
        loops.push((key, loop_tx));
    });
    Ok(rx)
}

/// Hands one ReadIndex round to the raft core.
fn ask(control: &Tx<Control>, reader: Reader) -> Result<(), ApiError> {
    control
        .try_send(Control::ReadIndex(reader))
        .map_err(crate::backend::refused)
}

/// Asks one round at a time for every reader waiting, and hands each its answer.
async fn read_loop(mut readers: mpsc::UnboundedReceiver<Reader>, control: Tx<Control>) {
    let mut group = Vec::new();
    while let Some(r) = readers.recv().await {
        group.push(r);
        while let Ok(r) = readers.try_recv() {
            group.push(r);
        }
        group.retain(|r| !r.is_closed());
        if group.is_empty() {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        let answer = match ask(&control, tx) {
            Ok(()) => crate::backend::answer(rx).await,
            Err(e) => Err(e),
        };
        for r in group.drain(..) {
            let _ = r.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn control() -> (Tx<Control>, crossbeam_channel::Receiver<Control>, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let bell = crate::bell::Bell::new(&poll).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(16);
        (Tx::new(tx, bell), rx, poll)
    }

    /// The round asked of the raft core, once the read loop has run.
    async fn asked(rx: &crossbeam_channel::Receiver<Control>) -> Option<Reader> {
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if let Ok(c) = rx.try_recv() {
                match c {
                    Control::ReadIndex(r) => return Some(r),
                    _ => panic!("a read loop asks only ReadIndex rounds"),
                }
            }
        }
        None
    }

    /// Reads waiting at one moment share one round; reads that come while it is out wait
    /// for the next, which is asked only once the first is answered; an error reaches every
    /// read of its round.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_share_one_round_at_a_time() {
        let (tx, rx, _poll) = control();
        let first: Vec<_> = (0..5).map(|_| join(1, &tx).unwrap()).collect();
        let round1 = asked(&rx).await.expect("a round for the first reads");
        let second: Vec<_> = (0..3).map(|_| join(1, &tx).unwrap()).collect();
        assert!(
            asked(&rx).await.is_none(),
            "a second round while the first is out"
        );

        round1.send(Ok(())).unwrap();
        for r in first {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(5), r).await,
                Ok(Ok(Ok(())))
            );
        }
        let round2 = asked(&rx).await.expect("a round for the reads that waited");
        assert!(asked(&rx).await.is_none(), "one round for all that waited");
        round2.send(Err(ApiError::LeaderChanged)).unwrap();
        for r in second {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(5), r).await,
                Ok(Ok(Err(ApiError::LeaderChanged)))
            );
        }

        // Another backend on the same thread has a loop of its own.
        let (tx2, rx2, _poll2) = control();
        let other = join(2, &tx2).unwrap();
        let round = asked(&rx2).await.expect("a round for the other backend");
        assert!(rx.try_recv().is_err());
        round.send(Ok(())).unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), other).await,
            Ok(Ok(Ok(())))
        );
    }

    /// A full control channel fails the round's reads with "too many requests"; a read whose
    /// client left is not asked for.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_channel_fails_the_round() {
        let poll = mio::Poll::new().unwrap();
        let bell = crate::bell::Bell::new(&poll).unwrap();
        let (raw, rx) = crossbeam_channel::bounded(1);
        let tx = Tx::new(raw, bell);
        let (filler, _) = oneshot::channel();
        tx.try_send(Control::ReadIndex(filler)).unwrap();
        let r = join(3, &tx).unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), r).await,
            Ok(Ok(Err(ApiError::TooManyRequests)))
        );
        let _ = rx.try_recv();
        drop(join(3, &tx).unwrap());
        assert!(
            asked(&rx).await.is_none(),
            "a round for a read nobody waits for"
        );
    }
}
