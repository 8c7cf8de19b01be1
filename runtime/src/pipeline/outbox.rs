//! Exactly-once, on the worker: the records an event produces are held
//! while it is handled, then sent together inside the transaction gate and
//! the partition's fence, and the event is noted finished in the open
//! transaction in the same pass, so no transaction holds part of an event.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::finalizer::{produce_failed, Delivery, OnRefused, Pending, Step};
use super::suspects::Treatment;
use super::transaction::Transactions;
use super::worker::{PartitionWorker, BACKLOG};
use crate::envelope::Produce;
use crate::publish::{refused_for_size, refused_in_transaction, Ack};
use crate::telemetry;

impl PartitionWorker {
    /// Holds a record of the event in hand: sent with the others once the
    /// event is handled.
    pub(super) fn hold(&self, p: &Produce) -> Ack {
        let mut outbox = self.outbox.borrow_mut();
        outbox.push(p.clone());
        Ack::Held(outbox.len() - 1)
    }

    /// Takes a handled event: sent with the events handled before it as
    /// soon as no commit is under way (one that is keeps the gate: the
    /// worker goes on with its next events meanwhile, up to
    /// [`BACKLOG`] of them), or on its own as `treatment` says. False when
    /// the worker must stop (fenced off, or its transaction fails).
    pub(super) fn take_handled(
        &mut self,
        p: Pending,
        treatment: Treatment,
        steps: &mpsc::Sender<Step>,
    ) -> bool {
        let outbox = std::mem::take(self.outbox.get_mut());
        if treatment == Treatment::Together {
            self.backlog.push((p, outbox));
            return self.send_backlog(self.backlog.len() >= BACKLOG, steps);
        }
        // An event sent differently goes after those before it.
        if !self.send_backlog(true, steps) {
            return false;
        }
        match self.send_held(p, outbox, treatment) {
            Some(p) => steps.blocking_send(Step::Done(p)).is_ok(),
            None => false,
        }
    }

    /// Sends the backlog's events in order and hands them to the
    /// finalizer; without `wait`, only if no commit holds the gate. False
    /// when the worker must stop.
    pub(super) fn send_backlog(&mut self, wait: bool, steps: &mpsc::Sender<Step>) -> bool {
        let Some(txn) = self.shared.txn.clone() else {
            return true;
        };
        if self.backlog.is_empty() {
            return true;
        }
        let gate = if wait {
            Some(txn.gate())
        } else {
            txn.try_gate()
        };
        let Some(gate) = gate else {
            return true;
        };
        let mut backlog = std::mem::take(&mut self.backlog);
        let sent = self.fence.pass(|| {
            backlog
                .iter_mut()
                .all(|(p, outbox)| self.send_records(&txn, p, std::mem::take(outbox), false))
        });
        drop(gate);
        if sent != Some(true) {
            return false;
        }
        backlog
            .into_iter()
            .all(|(p, _)| steps.blocking_send(Step::Done(p)).is_ok())
    }

    /// Sends the held records of a handled event, as `treatment` says: None
    /// when fenced off or when its transaction fails (the pipeline rewinds).
    fn send_held(
        &mut self,
        mut p: Pending,
        outbox: Vec<Produce>,
        treatment: Treatment,
    ) -> Option<Pending> {
        let txn = self.shared.txn.clone()?;
        let sent = match treatment {
            Treatment::Together | Treatment::DeadLetter => {
                let instead = treatment == Treatment::DeadLetter;
                let _gate = txn.gate();
                self.fence
                    .pass(|| self.send_records(&txn, &mut p, outbox, instead))
                    .unwrap_or(false)
            }
            Treatment::Alone | Treatment::DeadLetterAlone => {
                let tp = self.tp.clone();
                let instead = treatment == Treatment::DeadLetterAlone;
                let mut sent = false;
                let committed = txn.alone(&tp, p.offset, || {
                    sent = self
                        .fence
                        .pass(|| self.send_records(&txn, &mut p, outbox, instead))
                        .unwrap_or(false);
                    sent
                });
                if sent && !committed {
                    // Alone in its transaction: a refusal for good is its own.
                    if let Some((reason, size)) = refused_for_good(&mut p) {
                        txn.note_refused(&tp, p.offset, &reason, size, true);
                    }
                }
                committed
            }
            Treatment::Stop => false,
        };
        sent.then_some(p)
    }

    /// Sends an event's held records (with the gate and the fence held)
    /// and notes the event finished. With `dead_letter_instead`, each
    /// handler's outputs and retry record are replaced by its
    /// `produce-failed` dead letter. False when a record was refused
    /// before it was sent (the transaction aborts).
    fn send_records(
        &self,
        txn: &Transactions,
        p: &mut Pending,
        outbox: Vec<Produce>,
        dead_letter_instead: bool,
    ) -> bool {
        let mut outbox: Vec<Option<Produce>> = outbox.into_iter().map(Some).collect();
        let publisher = &self.shared.publisher;
        let mut sent = Vec::with_capacity(p.deliveries.len());
        for mut d in std::mem::take(&mut p.deliveries) {
            let Ack::Held(i) = d.ack else {
                sent.push(d);
                continue;
            };
            let record = outbox[i].take().expect("each held record is sent once");
            if let (true, OnRefused::DeadLetter(f)) = (dead_letter_instead, &d.on_refused) {
                if let Some(span) = &d.span {
                    telemetry::end(span);
                }
                if f.used.swap(true, Ordering::SeqCst) {
                    continue;
                }
                let reason = "the broker refused this event's records for good, even sent alone";
                let (produce, span, topic) = produce_failed(&self.shared, f, reason);
                p.marks.extend(f.mark.clone());
                let Some(ack) = publisher.send_fenced(&produce, || txn.ended()) else {
                    return cannot_send(txn);
                };
                sent.push(Delivery {
                    ack,
                    span,
                    counter: f.metrics.dead_letter_counter(),
                    on_refused: OnRefused::Stop(topic),
                    output: false,
                });
                continue;
            }
            let Some(ack) = publisher.send_fenced(&record, || txn.ended()) else {
                return cannot_send(txn);
            };
            d.ack = ack;
            sent.push(d);
        }
        p.deliveries = sent;
        // Refused before it was sent (e.g. above `message.max.bytes`): the
        // event's other records may be in the transaction already.
        if let Some(reason) = p.deliveries.iter().find_map(|d| match &d.ack {
            Ack::Refused(r) => Some(r.clone()),
            _ => None,
        }) {
            // This record itself is at fault (not a batch-mate).
            txn.refused(&self.tp, p.offset, &reason, false);
            return false;
        }
        // Counted (outputs, dead letters) once their transaction commits.
        let counted = p
            .deliveries
            .iter()
            .filter_map(|d| d.counter.clone())
            .collect();
        let outputs = p.deliveries.iter().filter(|d| d.output).count() as u64;
        txn.finished(
            &self.tp,
            p.offset,
            std::mem::take(&mut p.marks),
            (std::mem::take(&mut p.state), &self.overlay),
            counted,
            outputs,
        );
        true
    }
}

/// The reason a record of `p` was refused for good, once its deliveries
/// ended (after its transaction's commit failed).
fn refused_for_good(p: &mut Pending) -> Option<(String, bool)> {
    use futures::FutureExt;
    for d in &mut p.deliveries {
        let Ack::Pending(delivery) = &mut d.ack else {
            continue;
        };
        // The abort ended every delivery; their reports may still be on
        // their way from the producer's thread.
        for _ in 0..50 {
            match delivery.now_or_never() {
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
                Some(Ok(Err((e, _)))) if refused_in_transaction(&e) => {
                    return Some((e.to_string(), refused_for_size(&e)));
                }
                Some(_) => break,
            }
        }
    }
    None
}

/// A record of the event could not be sent (the transaction takes no more,
/// or the runtime halts): some of its records may be in the transaction
/// already, so it must not commit. False, for `send_records`.
fn cannot_send(txn: &Transactions) -> bool {
    txn.fail("the transaction takes no more records".into());
    false
}
