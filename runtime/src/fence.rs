//! A partition's fence: once closed (the partition was revoked, or its
//! events were abandoned), nothing of that partition's worker or finalizer
//! is published, marked or committed any more.
//!
//! Checking a flag before a send is not enough: the check and the send are
//! two steps, and a revoke may fall between them. Sends, marks and offset
//! stores run inside [`Fence::pass`] (a shared lock), and [`Fence::close`]
//! takes the lock exclusively, so when `close` returns, every action that
//! passed has been done and none will pass again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Fence {
    closed: AtomicBool,
    gate: RwLock<()>,
}

impl Fence {
    /// Whether the fence is closed (for loops that should stop waiting).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the fence; waits for the actions passing it to finish.
    pub fn close(&self) {
        let _all = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Sleeps for `d` in slices, so a close is noticed; false when closed.
    pub fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.is_closed() {
                return false;
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        !self.is_closed()
    }

    /// Runs `action` unless the fence is closed; a `close` waits for it.
    pub fn pass<T>(&self, action: impl FnOnce() -> T) -> Option<T> {
        let _one = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(action())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn nothing_passes_a_closed_fence() {
        let f = Fence::default();
        assert_eq!(f.pass(|| 1), Some(1));
        f.close();
        assert!(f.is_closed());
        assert_eq!(f.pass(|| 2), None);
    }

    #[test]
    fn close_waits_for_the_action_passing() {
        let f = Arc::new(Fence::default());
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let passing = {
            let f = f.clone();
            std::thread::spawn(move || {
                f.pass(|| {
                    entered_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(200));
                    Instant::now()
                })
            })
        };
        entered.recv().unwrap();
        f.close();
        let closed_at = Instant::now();
        let done_at = passing.join().unwrap().expect("it passed before the close");
        assert!(
            done_at <= closed_at,
            "close returned before the action ended"
        );
    }
}
