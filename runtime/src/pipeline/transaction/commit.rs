//! The commit of the open transaction: the changelog records of its marks
//! and state writes, the input offsets with the group's metadata, the
//! commit itself, the local store after it; aborts, fatal errors, and the
//! committer thread that commits every interval.

use super::*;

impl Transactions {
    /// Commits the open transaction (nothing to do: true at once). False
    /// when it aborted or the runtime halts.
    pub(in crate::pipeline) fn commit(&self) -> bool {
        // Taken before the locks: the consumer is never dropped under them.
        let cgm = self.group_metadata();
        let mut state = self.lock_state();
        let waited = Instant::now();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        debug!(
            ms = waited.elapsed().as_millis() as u64,
            "transaction gate taken"
        );
        self.commit_locked(&mut state, cgm.as_ref())
    }

    pub(super) fn commit_locked(
        &self,
        state: &mut State,
        cgm: Option<&ConsumerGroupMetadata>,
    ) -> bool {
        if state.ended || !state.open {
            return false;
        }
        let doomed = self
            .doomed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reason) = doomed {
            self.abort(state, &reason);
            return false;
        }
        let started = Instant::now();
        // The gate is held: no event is finished meanwhile (an offset
        // deferred meanwhile is above every finished one).
        let mut offsets = TopicPartitionList::new();
        let mut marks: Vec<(i32, Vec<Vec<u8>>)> = Vec::new();
        // Per partition: its state writes, its overlay, its last event.
        let mut writes_of: Vec<PartWrites> = Vec::new();
        let mut events = 0;
        {
            let mut parts = self.lock_parts();
            for ((topic, partition), part) in parts.iter_mut() {
                events += part.events;
                if !part.state.is_empty() {
                    writes_of.push(PartWrites {
                        tp: (topic.clone(), *partition),
                        writes: std::mem::take(&mut part.state),
                        overlay: part.overlay.clone(),
                        last: part.last,
                        deliveries: Vec::new(),
                    });
                }
                if let Some(o) = part.offsets.storable() {
                    if let Err(e) =
                        offsets.add_partition_offset(topic, *partition, Offset::Offset(o + 1))
                    {
                        error!(topic, partition, error = %e, "cannot list an offset");
                    }
                }
                if !part.marks.is_empty() {
                    marks.push((*partition, part.marks.iter().cloned().collect()));
                }
            }
        }
        let sent = self.sent.swap(false, Ordering::Relaxed);
        if !sent && offsets.count() == 0 && marks.is_empty() && writes_of.is_empty() {
            return true;
        }
        let at = crate::dedup::now_ms();
        let producer = self.publisher.producer();
        let result = (|| {
            self.write_changelog(&marks, at)?;
            self.write_state_changelog(&mut writes_of)?;
            if offsets.count() > 0 {
                let Some(cgm) = cgm else {
                    return Err(Failure::Abort(
                        "the consumer has no group metadata (not in the group)".into(),
                    ));
                };
                self.call("send the offsets to the transaction", || {
                    producer.send_offsets_to_transaction(&offsets, cgm, self.timeout)
                })?;
            }
            let offsets_ms = started.elapsed().as_millis() as u64;
            // The records' acknowledgements first: rust-rdkafka's flush
            // inside the commit polls the event queue in steps of 100 ms
            // that its polling thread wins, so every commit with a record
            // outstanding took 100 ms more (docs/benchmarks.md).
            let until = Instant::now() + self.timeout;
            while producer.in_flight_count() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.call("commit the transaction", || {
                producer.commit_transaction(self.timeout)
            })?;
            debug!(
                offsets_ms,
                commit_ms = started.elapsed().as_millis() as u64 - offsets_ms,
                "transaction steps"
            );
            Ok(())
        })();
        match result {
            Ok(()) => {}
            Err(Failure::Abort(reason)) => {
                self.abort(state, &reason);
                return false;
            }
            Err(Failure::Fatal(reason)) => {
                self.fatal(state, reason);
                return false;
            }
        }
        let took = started.elapsed();
        if let Some(m) = &self.metrics {
            m.transactions.with_label_values(&["committed"]).inc();
            m.transaction_seconds.observe(took.as_secs_f64());
        }
        debug!(
            partitions = offsets.count(),
            ms = took.as_millis() as u64,
            "transaction committed"
        );
        if let Some(dedup) = &self.dedup {
            let keys = marks.iter().flat_map(|(_, k)| k.iter().map(Vec::as_slice));
            let writes: Vec<&Write> = writes_of.iter().flat_map(|p| &p.writes).collect();
            let retire: Vec<(&Overlay, i64)> = writes_of
                .iter()
                .filter_map(|p| Some((p.overlay.as_deref()?, p.last)))
                .collect();
            let mut backoff = Duration::from_millis(50);
            let mut written = false;
            for attempt in 1..=5 {
                // The state writes in the same write batch as the marks.
                let result = match self.state_store.get() {
                    Some(s) if !writes.is_empty() => s.persist(keys.clone(), at, &writes, &retire),
                    _ => dedup.mark_at(keys.clone(), at),
                };
                let Err(e) = result else {
                    written = true;
                    break;
                };
                // They are in the changelog, restored with the partition.
                error!(error = %format!("{e:#}"), attempt, "committed marks not written to the local store");
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            if !written && !writes.is_empty() {
                // Later events would read the state as it was before this
                // transaction: the pipeline rewinds, and its partitions'
                // state is restored from the changelog.
                self.fail(
                    "the committed state writes could not be written to the local store".into(),
                );
            }
            if let (true, Some(state), Some(changelog)) =
                (written, self.state_store.get(), self.changelog.get())
            {
                self.state_checkpoints(state, changelog, &mut writes_of);
            }
        }
        let mut outputs = 0;
        for part in self.lock_parts().values_mut() {
            part.marks.clear();
            part.events = 0;
            for c in part.counted.drain(..) {
                c.inc();
            }
            outputs += std::mem::take(&mut part.outputs);
        }
        self.stats.events_final.fetch_add(events, Ordering::Relaxed);
        self.stats.outputs.fetch_add(outputs, Ordering::Relaxed);
        match self.call("begin a transaction", || producer.begin_transaction()) {
            Ok(()) => true,
            Err(Failure::Abort(reason)) => {
                self.abort(state, &reason);
                false
            }
            Err(Failure::Fatal(reason)) => {
                self.fatal(state, reason);
                false
            }
        }
    }

    /// Enqueues the marks of the transaction's events to the changelog
    /// (their deliveries are part of the commit).
    pub(super) fn write_changelog(
        &self,
        marks: &[(i32, Vec<Vec<u8>>)],
        at: u64,
    ) -> Result<(), Failure> {
        let Some(changelog) = self.changelog.get() else {
            return Ok(());
        };
        for (partition, keys) in marks {
            for chunk in keys.chunks(MARKS_PER_RECORD) {
                loop {
                    let keys = chunk.iter().map(Vec::as_slice);
                    match changelog.write(&self.publisher, *partition, keys, at) {
                        // Refused for good: logged and counted; the marks
                        // stay in this instance's store.
                        Ok(_) => break,
                        Err(_) if self.publisher.halt().reason().is_some() => {
                            return Err(Failure::Fatal("halting".into()));
                        }
                        // The producer's queue drains as the broker answers.
                        Err(wait) if wait == QUEUE_FULL_WAIT => std::thread::sleep(wait),
                        Err(_) => {
                            return Err(Failure::Abort(
                                "cannot write the idempotency changelog".into(),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Enqueues the state writes of the transaction's events to the state
    /// changelog, the last of each key (part of the commit).
    pub(super) fn write_state_changelog(&self, state: &mut [PartWrites]) -> Result<(), Failure> {
        let Some(changelog) = self.changelog.get() else {
            return Ok(());
        };
        for part in state {
            let mut last: HashMap<&[u8], &Write> = HashMap::new();
            for w in &part.writes {
                last.insert(&w.key, w);
            }
            for w in last.into_values() {
                loop {
                    match changelog.write_state(&self.publisher, part.tp.1, w) {
                        Ok(Some(d)) => {
                            part.deliveries.push(d);
                            break;
                        }
                        // Refused for good: the store must not hold what
                        // the changelog does not.
                        Ok(None) => {
                            return Err(Failure::Abort(
                                "a state write was refused by the state changelog".into(),
                            ))
                        }
                        Err(_) if self.publisher.halt().reason().is_some() => {
                            return Err(Failure::Fatal("halting".into()));
                        }
                        Err(wait) if wait == QUEUE_FULL_WAIT => std::thread::sleep(wait),
                        Err(_) => {
                            return Err(Failure::Abort("cannot write the state changelog".into()))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// After a commit: each partition's state checkpoint moves past its
    /// committed state records (a restore here reads only what is newer).
    pub(super) fn state_checkpoints(
        &self,
        state: &StateStore,
        changelog: &Changelog,
        parts: &mut [PartWrites],
    ) {
        use futures::FutureExt;
        for part in parts {
            let next = part
                .deliveries
                .drain(..)
                .filter_map(|d| match d.now_or_never() {
                    Some(Ok(Ok(delivered))) => Some(delivered.offset + 1),
                    _ => None,
                })
                .max();
            if let Some(next) = next {
                let topic = changelog.state_topic();
                if let Err(e) = state.set_checkpoint(topic, &part.tp.0, part.tp.1, next) {
                    warn!(error = %format!("{e:#}"), "cannot keep the state checkpoint");
                }
            }
        }
    }

    /// Runs one transactional call, again while it fails with a retriable
    /// error (a few times).
    pub(super) fn call(&self, what: &str, f: impl Fn() -> KafkaResult<()>) -> Result<(), Failure> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let err = match f() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let (fatal, retriable) = match &err {
                KafkaError::Transaction(t) => (t.is_fatal(), t.is_retriable()),
                _ => (false, false),
            };
            if fatal {
                let hint = err
                    .rdkafka_error_code()
                    .map(|c| fenced_hint(c, Some(&self.id)))
                    .unwrap_or_default();
                return Err(Failure::Fatal(format!("cannot {what}: {err}{hint}")));
            }
            if retriable && attempt <= RETRIES {
                warn!(error = %err, attempt, "cannot {what}; retrying");
                std::thread::sleep(backoff);
                backoff *= 2;
                attempt += 1;
                continue;
            }
            return Err(Failure::Abort(format!("cannot {what}: {err}")));
        }
    }

    /// No transaction is open any more: what is sent now cannot commit.
    pub(in crate::pipeline) fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Aborts the open transaction; the pipeline rewinds.
    pub(super) fn abort(&self, state: &mut State, reason: &str) {
        state.ended = true;
        self.ended.store(true, Ordering::SeqCst);
        state.open = false;
        warn!(
            reason,
            "transaction aborted: its events are handled again from the committed offsets"
        );
        if let Some(m) = &self.metrics {
            m.transactions.with_label_values(&["aborted"]).inc();
        }
        if let Err(e) = self.publisher.producer().abort_transaction(self.timeout) {
            let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
            if fatal {
                self.fatal(state, format!("cannot abort the transaction: {e}"));
                return;
            }
            // The next producer with this id aborts it when it starts.
            error!(error = %e, "cannot abort the transaction");
        }
        self.health.set_problem(
            PROBLEM,
            format!("a transaction aborted ({reason}); rewinding to the committed offsets"),
        );
        self.rewind.send_replace(Some(reason.to_owned()));
    }

    pub(super) fn fatal(&self, state: &mut State, reason: String) {
        state.ended = true;
        self.ended.store(true, Ordering::SeqCst);
        state.open = false;
        self.publisher.halt().halt_now(reason);
    }

    /// Commits every commit interval (sooner when a transaction is doomed)
    /// until `stop`, on its own thread.
    pub(in crate::pipeline) fn spawn_committer(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let txn = self.clone();
        std::thread::Builder::new()
            .name("weir-transactions".into())
            .spawn(move || {
                let halt = txn.publisher.halt().clone();
                let run = std::panic::AssertUnwindSafe(|| txn.commit_every(&stop));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    halt.halt(format!(
                        "the transaction committer panicked: {}",
                        crate::halt::panic_text(panic.as_ref())
                    ));
                }
            })
            .expect("spawning the committer thread")
    }

    pub(super) fn commit_every(&self, stop: &AtomicBool) {
        let txn = self;
        loop {
            {
                let (lock, cvar) = &txn.wake;
                let woken = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let (mut woken, _) = cvar
                    .wait_timeout_while(woken, txn.interval, |w| !*w)
                    .unwrap_or_else(PoisonError::into_inner);
                *woken = false;
            }
            if stop.load(Ordering::SeqCst) || txn.lock_state().ended {
                return;
            }
            txn.commit();
        }
    }

    /// Stops the committer thread.
    pub(in crate::pipeline) fn stop_committer(&self, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        self.poke();
    }
}
