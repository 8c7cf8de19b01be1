//! Exactly-once: events whose records the broker refused for good, and
//! how each is sent the next time (see `transaction`'s notes): a refusal
//! for a record batch's size may be a batch-mate's fault, so the event is
//! first sent alone; one refused for itself, or refused alone, is
//! dead-lettered; one whose dead letter is refused too stops its
//! partition. Kept across the pipeline's rewinds (in the pipeline's `Stats`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::consumer::TopicPartition;

/// How each event whose records were refused for good is to be sent,
/// kept across the pipeline's rewinds (see the module's notes).
#[derive(Debug, Default)]
pub struct Suspects(Mutex<HashMap<(String, i32, i64), Treatment>>);

impl Suspects {
    pub(super) fn get(&self, tp: &TopicPartition, offset: i64) -> Treatment {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(tp.0.clone(), tp.1, offset))
            .copied()
            .unwrap_or(Treatment::Together)
    }

    /// Notes a refusal of the event's records (`size`: for a record
    /// batch's size, which may be a batch-mate's fault; `alone`: the event
    /// was alone in its transaction): how it is sent next time.
    pub(super) fn refused(
        &self,
        tp: &TopicPartition,
        offset: i64,
        size: bool,
        alone: bool,
    ) -> Treatment {
        use Treatment as T;
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let t = map
            .entry((tp.0.clone(), tp.1, offset))
            .or_insert(T::Together);
        *t = match (*t, size, alone) {
            (T::Together | T::Alone, true, false) => T::Alone,
            (T::Together | T::Alone, false, _) => T::DeadLetter,
            (T::Together | T::Alone, true, true) => T::DeadLetterAlone,
            (T::DeadLetter, true, false) => T::DeadLetterAlone,
            (T::DeadLetter | T::DeadLetterAlone | T::Stop, _, _) => T::Stop,
        };
        *t
    }

    /// Forgets the events of a partition given up.
    pub(super) fn forget_partition(&self, tp: &TopicPartition) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|(t, p, _), _| !(t == &tp.0 && *p == tp.1));
    }

    pub(super) fn cleared(&self, tp: &TopicPartition, offset: i64) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(&(tp.0.clone(), tp.1, offset));
    }
}

/// How the worker sends an event, by how its records were refused before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Treatment {
    /// Sent with the others.
    Together,
    /// Refused for a batch's size: sent alone in a transaction of its own,
    /// to tell whether it is at fault.
    Alone,
    /// Refused for itself: its handlers' outputs and retry records are
    /// replaced by their `produce-failed` dead letters.
    DeadLetter,
    /// As `DeadLetter`, alone in a transaction of its own (refused alone,
    /// or its dead letter refused for a batch's size).
    DeadLetterAlone,
    /// Its dead letter was refused for good too: the partition stops.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_event_is_isolated_then_dead_lettered_then_stops_its_partition() {
        use Treatment as T;
        let s = Suspects::default();
        let tp = ("t".to_owned(), 0);
        // Refused for a batch's size: maybe a batch-mate's fault.
        assert_eq!(s.refused(&tp, 7, true, false), T::Alone);
        // Refused again, alone: its own fault.
        assert_eq!(s.refused(&tp, 7, true, true), T::DeadLetterAlone);
        // Its dead letter refused alone too.
        assert_eq!(s.refused(&tp, 7, true, true), T::Stop);
        // Refused for itself (e.g. its topic does not exist): dead-lettered
        // at once, with the others.
        assert_eq!(s.refused(&tp, 8, false, false), T::DeadLetter);
        assert_eq!(s.get(&tp, 9), T::Together);
        s.cleared(&tp, 8);
        assert_eq!(s.get(&tp, 8), T::Together);
    }
}
