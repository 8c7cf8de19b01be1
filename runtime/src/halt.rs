//! Stopping the runtime for good from wherever the cause is noticed: a
//! partition worker that panicked, a fatal producer error. The first reason
//! is kept, `/readyz` turns 503 with it at once, and `weir run` stops and
//! exits non-zero so that its supervisor restarts it; nothing is committed
//! past an event whose outcome is not final.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::error;

use crate::metrics::Health;

/// A handle that stops the runtime with a reason.
#[derive(Clone)]
pub struct Halt {
    tx: Arc<watch::Sender<Option<String>>>,
    health: Arc<Health>,
    /// Set when nothing more can be finished (the producer is broken), so
    /// the stop does not wait for in-flight events.
    now: Arc<std::sync::atomic::AtomicBool>,
}

impl Halt {
    /// A halt signal and the receiver the pipeline waits on.
    pub fn new(health: Arc<Health>) -> (Self, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                tx: Arc::new(tx),
                health,
                now: Default::default(),
            },
            rx,
        )
    }

    /// Stops the runtime; the first reason wins. Callable from any thread.
    pub fn halt(&self, reason: String) {
        let first = self.tx.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.clone());
            true
        });
        if first {
            error!(reason = %reason, "stopping: the runtime cannot go on safely");
            self.health.set_problem("halted", reason);
        }
    }

    /// Stops the runtime without finishing in-flight events: what is
    /// final is committed, the rest is redelivered.
    pub fn halt_now(&self, reason: String) {
        self.now.store(true, std::sync::atomic::Ordering::SeqCst);
        self.halt(reason);
    }

    /// Whether the stop must not wait for in-flight events.
    pub fn is_immediate(&self) -> bool {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The reason, once halted.
    pub fn reason(&self) -> Option<String> {
        self.tx.borrow().clone()
    }
}

/// The text of a panic payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_readiness_reports_it() {
        let health = Arc::new(Health::default());
        let (halt, rx) = Halt::new(health.clone());
        halt.halt("worker orders/0 panicked: boom".into());
        halt.halt("later".into());
        assert_eq!(
            rx.borrow().as_deref(),
            Some("worker orders/0 panicked: boom")
        );
        assert!(health
            .not_ready()
            .is_some_and(|r| r.contains("worker orders/0 panicked: boom")));
    }

    #[test]
    fn panic_payloads_become_text() {
        let p = std::panic::catch_unwind(|| panic!("at offset {}", 3)).unwrap_err();
        assert_eq!(panic_text(p.as_ref()), "at offset 3");
    }
}
