//! A partition's offsets on their way to a commit: handed over in order or
//! out of order (retry records held until due), final, and storable (the
//! last final one below every unfinished one). The finalizer keeps one per
//! partition (at-least-once), the open transaction one per partition it
//! holds events of (exactly-once).

use std::collections::BTreeSet;

/// Offsets of one partition: handed over, final, and storable.
#[derive(Debug, Default)]
pub(super) struct Offsets {
    /// Handed over out of order (deferred) and not final yet.
    unfinished: BTreeSet<i64>,
    /// Final, but above an unfinished one.
    finished: BTreeSet<i64>,
    /// The highest offset with nothing unfinished at or below it.
    watermark: Option<i64>,
    /// What was last returned by [`Offsets::storable`].
    stored: Option<i64>,
}

impl Offsets {
    /// An event that will become final later, out of order.
    pub(super) fn defer(&mut self, offset: i64) {
        self.unfinished.insert(offset);
    }

    /// An event's outcome is final (deferred or not).
    pub(super) fn finish(&mut self, offset: i64) {
        self.unfinished.remove(&offset);
        self.finished.insert(offset);
        let below = match self.unfinished.first() {
            Some(&low) => low,
            None => i64::MAX,
        };
        while let Some(&o) = self.finished.first() {
            if o >= below {
                break;
            }
            self.finished.pop_first();
            self.watermark = Some(self.watermark.map_or(o, |w| w.max(o)));
        }
    }

    /// The offset to store now, if it moved since the last call: the last
    /// final event below every unfinished one.
    pub(super) fn storable(&mut self) -> Option<i64> {
        if self.watermark > self.stored {
            self.stored = self.watermark;
            self.watermark
        } else {
            None
        }
    }

    /// Events handed over and not final.
    #[cfg(test)]
    pub(super) fn unfinished(&self) -> usize {
        self.unfinished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completions_store_each_offset() {
        let mut o = Offsets::default();
        o.finish(0);
        assert_eq!(o.storable(), Some(0));
        o.finish(1);
        o.finish(2);
        assert_eq!(o.storable(), Some(2));
        assert_eq!(o.storable(), None, "nothing new to store");
    }

    #[test]
    fn out_of_order_completions_store_only_below_the_lowest_unfinished() {
        let mut o = Offsets::default();
        for off in [10, 11, 12, 13] {
            o.defer(off);
        }
        o.finish(12);
        o.finish(13);
        assert_eq!(o.storable(), None, "10 and 11 are not final");
        o.finish(10);
        assert_eq!(o.storable(), Some(10));
        o.finish(11);
        assert_eq!(o.storable(), Some(13), "11 released 12 and 13");
        assert_eq!(o.unfinished(), 0);
    }

    #[test]
    fn a_deferred_event_holds_back_later_in_order_ones() {
        let mut o = Offsets::default();
        o.finish(4);
        o.defer(5);
        o.finish(6);
        o.finish(7);
        assert_eq!(o.storable(), Some(4));
        o.finish(5);
        assert_eq!(o.storable(), Some(7));
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_anything_back() {
        // Compacted topics and transaction markers leave holes.
        let mut o = Offsets::default();
        o.finish(3);
        o.finish(9);
        assert_eq!(o.storable(), Some(9));
    }
}
