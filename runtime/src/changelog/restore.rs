//! The restore of a partition's marks and state from the changelogs
//! before its first event: from the store's checkpoint to the end, retried
//! until done, stopped by a revoke or a shutdown.

use super::*;

impl Changelog {
    /// Restores into `dedup` the marks of input partition `partition`'s
    /// changelog partition that it does not have yet, and into `state` the
    /// state of input partition `topic`/`partition` from its state
    /// changelog partition (the records of other input partitions there
    /// are not touched: one of them may be this instance's and newer in
    /// its store than in the topic), retrying until done (the partition is
    /// reported in `health` while a restore fails); None when `stop`
    /// (revoke, shutdown) or the fence ended it first. What was restored
    /// before a stop is kept, with its checkpoint.
    pub fn restore(
        &self,
        dedup: &Dedup,
        state: Option<&StateStore>,
        (topic, partition): (&str, i32),
        fence: &Fence,
        stop: &AtomicBool,
        health: &Health,
    ) -> Option<Restored> {
        let target = self.partition_of(partition);
        let _one = self.restoring[target as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let marks = self.retrying(&self.topic, target, fence, stop, health, || {
            self.try_restore_marks(dedup, target, fence, stop)
        })?;
        let took = started.elapsed();
        if let Some(m) = &self.metrics {
            m.restore_seconds.observe(took.as_secs_f64());
            m.restored_marks.inc_by(marks);
        }
        info!(topic = %self.topic, partition = target, marks, ms = took.as_millis() as u64,
            "idempotency marks restored");
        let mut r = Restored {
            partition: target,
            marks,
            state_writes: 0,
            took,
            state_took: Duration::ZERO,
        };
        if let Some(state) = state {
            let started = Instant::now();
            let target = self.state_partition_of(partition);
            r.state_writes =
                self.retrying(&self.state_topic, target, fence, stop, health, || {
                    self.try_restore_state(state, topic, partition, fence, stop)
                })?;
            r.state_took = started.elapsed();
            if let Some(m) = &self.metrics {
                m.state_restore_seconds.observe(r.state_took.as_secs_f64());
            }
            if r.state_writes > 0 {
                info!(topic = %self.state_topic, partition = target, writes = r.state_writes,
                    ms = r.state_took.as_millis() as u64, "handler state restored");
            }
        }
        Some(r)
    }

    /// Runs one restore until it succeeds: what it restored, None when
    /// stopped.
    pub(super) fn retrying(
        &self,
        topic: &str,
        target: i32,
        fence: &Fence,
        stop: &AtomicBool,
        health: &Health,
        mut attempt: impl FnMut() -> Result<Option<u64>>,
    ) -> Option<u64> {
        let problem = format!("changelog {topic}/{target}");
        let mut backoff = Duration::from_millis(200);
        loop {
            match attempt() {
                Ok(done) => {
                    health.clear_problem(&problem);
                    return done;
                }
                Err(e) => {
                    self.error();
                    error!(topic, partition = target, error = %format!("{e:#}"),
                        "cannot restore from the changelog; the partition waits and retries");
                    health.set_problem(
                        &problem,
                        format!("cannot restore {problem} (its input partitions wait): {e:#}"),
                    );
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stop.load(Ordering::SeqCst) || !fence.sleep(Duration::from_millis(50)) {
                            health.clear_problem(&problem);
                            return None;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One attempt at the marks: how many were restored, None when fenced
    /// off.
    pub(super) fn try_restore_marks(
        &self,
        dedup: &Dedup,
        target: i32,
        fence: &Fence,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let from = |low: i64, high: i64| -> Result<i64> {
            // A checkpoint past the end: the topic was recreated; read it all.
            Ok(match dedup.checkpoint(&self.topic, target)? {
                Some(c) if c <= high => c.max(low),
                _ => low,
            })
        };
        let mut marks = 0u64;
        let apply = |m: &BorrowedMessage<'_>| -> Result<()> {
            let Some(payload) = m.payload() else {
                return Ok(());
            };
            match rmp_serde::from_slice::<MarkBatch>(payload) {
                Ok(batch) => {
                    dedup.mark_at(batch.keys.iter().map(|k| k.as_slice()), batch.at)?;
                    marks += batch.keys.len() as u64;
                }
                Err(e) => {
                    warn!(topic = %self.topic, partition = target, offset = m.offset(),
                        error = %e, "a changelog record that is not a batch of marks is skipped")
                }
            }
            Ok(())
        };
        let done = self.replay(
            (&self.topic, target),
            |next| dedup.set_checkpoint(&self.topic, target, next),
            fence,
            stop,
            from,
            apply,
            || Ok(()),
        )?;
        Ok(done.map(|()| marks))
    }

    /// One attempt at the state of input partition `input`/`partition`:
    /// how many writes were applied, None when fenced off.
    pub(super) fn try_restore_state(
        &self,
        state: &StateStore,
        input: &str,
        partition: i32,
        fence: &Fence,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let topic = &self.state_topic;
        let target = self.state_partition_of(partition);
        // One checkpoint per input partition (they may share a changelog
        // partition, each restored when it is assigned), in the state's
        // column family: it does not expire.
        let from = |low: i64, high: i64| -> Result<i64> {
            match state.checkpoint(topic, input, partition)? {
                Some((c, at))
                    if c <= high
                        && at.saturating_add(STATE_CHECKPOINT_MAX_AGE_MS)
                            >= crate::dedup::now_ms() =>
                {
                    Ok(c.max(low))
                }
                None => Ok(low),
                // Recreated, or too old to trust: from the start, over a
                // clean slate.
                Some(_) => {
                    self.clear_state(state, input, partition)?;
                    Ok(low)
                }
            }
        };
        let mut applied = 0u64;
        let pending = std::cell::RefCell::new(Vec::<Write>::new());
        let flush = &|| -> Result<()> {
            let mut p = pending.borrow_mut();
            if !p.is_empty() {
                state.persist([], 0, &p.iter().collect::<Vec<_>>(), &[])?;
                p.clear();
            }
            Ok(())
        };
        let apply = |m: &BorrowedMessage<'_>| -> Result<()> {
            let Some(key) = m.key() else { return Ok(()) };
            let Some((_, t, p, _)) = crate::state::split_key(key) else {
                return Ok(());
            };
            if t != input || p != partition {
                return Ok(());
            }
            // A value that expired meanwhile is stored as it is: reads
            // do not see it, and the worker's sweep deletes it, with a
            // tombstone in the changelog.
            pending.borrow_mut().push(Write {
                key: key.to_vec(),
                value: m.payload().map(<[u8]>::to_vec),
                delta: 0,
            });
            applied += 1;
            if pending.borrow().len() >= 1000 {
                flush()?;
            }
            Ok(())
        };
        let done = self.replay(
            (topic, target),
            |next| state.set_checkpoint(topic, input, partition, next),
            fence,
            stop,
            from,
            apply,
            flush,
        )?;
        Ok(done.map(|()| applied))
    }

    /// Deletes from the store the state of input partition
    /// `input`/`partition` (of every handler).
    pub(super) fn clear_state(
        &self,
        state: &StateStore,
        input: &str,
        partition: i32,
    ) -> Result<()> {
        let dedup = state.dedup();
        let mut deletes = Vec::new();
        for item in dedup
            .db()
            .iterator_cf(dedup.state_cf(), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item.context("reading the state store")?;
            if crate::state::split_key(&k).is_some_and(|(_, t, p, _)| t == input && p == partition)
            {
                deletes.push(Write {
                    key: k.to_vec(),
                    value: None,
                    delta: 0,
                });
            }
        }
        warn!(
            topic = input,
            partition,
            keys = deletes.len(),
            "the local state of this partition is restored from the changelog's start"
        );
        state.persist([], 0, &deletes.iter().collect::<Vec<_>>(), &[])
    }

    /// Reads `topic`/`target` from where `from` says (given the low and
    /// high watermarks) to its end, applying each record, then `flush`, and
    /// keeps the checkpoint (with `set_checkpoint`); None when fenced off
    /// or stopped.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn replay(
        &self,
        (topic, target): (&str, i32),
        set_checkpoint: impl Fn(i64) -> Result<()>,
        fence: &Fence,
        stop: &AtomicBool,
        from: impl FnOnce(i64, i64) -> Result<i64>,
        mut apply: impl FnMut(&BorrowedMessage<'_>) -> Result<()>,
        flush: impl Fn() -> Result<()>,
    ) -> Result<Option<()>> {
        let consumer: BaseConsumer = self
            .client
            .create()
            .context("cannot create the changelog consumer")?;
        let (low, high) = consumer
            .fetch_watermarks(topic, target, Duration::from_secs(10))
            .context("cannot read the changelog's offsets")?;
        let from = from(low, high)?;
        if from >= high {
            set_checkpoint(high)?;
            return Ok(Some(()));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, target, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut next = from;
        let mut idle = Instant::now();
        let mut last_checkpoint = Instant::now();
        let checkpoint = |next: i64| -> Result<()> {
            flush()?;
            set_checkpoint(next)
        };
        // Reading committed records only, the end is where committed ones
        // stop: below another instance's open transaction (exactly-once)
        // the committed records after it wait for it to end, which takes
        // at most its timeout.
        let mut end_since: Option<Instant> = None;
        while next < high {
            if let Some(t) = end_since {
                let at = consumer
                    .position()
                    .ok()
                    .and_then(|tpl| {
                        tpl.find_partition(topic, target)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .unwrap_or(next);
                if at >= high || t.elapsed() >= self.open_transaction_wait {
                    break;
                }
            }
            if fence.is_closed() || stop.load(Ordering::SeqCst) {
                // Kept for the next restore of this partition, here.
                checkpoint(next)?;
                return Ok(None);
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {
                    if idle.elapsed() > Duration::from_secs(30) {
                        bail!("no changelog record for 30 s at offset {next} (end {high})");
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    end_since.get_or_insert_with(Instant::now);
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    idle = Instant::now();
                    next = m.offset() + 1;
                    apply(&m)?;
                    if last_checkpoint.elapsed() > Duration::from_secs(1) {
                        checkpoint(next)?;
                        last_checkpoint = Instant::now();
                    }
                }
            }
        }
        checkpoint(next)?;
        Ok(Some(()))
    }
}

/// What one restore did.
#[derive(Debug)]
pub struct Restored {
    pub partition: i32,
    pub marks: u64,
    /// State records applied (writes and deletes).
    pub state_writes: u64,
    /// How long the marks took.
    pub took: Duration,
    /// How long the state took, after the marks.
    pub state_took: Duration,
}
