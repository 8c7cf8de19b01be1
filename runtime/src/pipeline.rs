//! The consumer pipeline: Kafka partitions → per-partition ordered workers →
//! handler calls → outputs or dead letters → ordered finalizer → offsets.
//!
//! Each assigned partition gets a worker thread that handles its events one
//! at a time, in offset order, and an ordered finalizer task that awaits the
//! acknowledgements of what each event produced and only then stores the
//! event's offset. Stored offsets are committed periodically, on revoke and
//! on shutdown, so a commit never passes an event whose outcome is not final.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use opentelemetry::trace::SpanKind;
use opentelemetry::{Context as TraceContext, KeyValue};
use prometheus::IntCounter;
use rdkafka::client::ClientContext;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, RetryMode};
use crate::deadletter::{self, DeadLetter};
use crate::dedup::{self, Dedup};
use crate::envelope::{self, Produce, Record};
use crate::failure::FailureKind;
use crate::finalizer::Offsets;
use crate::halt::{panic_text, Halt};
use crate::handler::{CallOutcome, HandlerInstance, LoadedHandler};
use crate::kafka::{client_config, consumer_config};
use crate::metrics::{HandlerMetrics, Health, Metrics};
use crate::publish::{Ack, Acked, Publisher};
use crate::replay;
use crate::retry_topic::{self, DelayQueue, RetryInfo};
use crate::telemetry::{self, attr, Tracing};

type TopicPartition = (String, i32);

/// Counters of what the pipeline did, shared with whoever runs it.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events whose outcome is final (handled, skipped or dead-lettered).
    pub events_final: AtomicU64,
    /// Handler calls that succeeded.
    pub handled: AtomicU64,
    /// Records sent to a dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Output records acknowledged by the broker.
    pub outputs: AtomicU64,
    /// Retries of `retriable` failures.
    pub retries: AtomicU64,
    /// Handler calls skipped because the event was already handled.
    pub duplicates: AtomicU64,
    /// Fuel used by handler calls.
    pub fuel_used: AtomicU64,
    /// Times a worker waited for its handler's fuel budget to refill.
    pub budget_waits: AtomicU64,
    /// Partitions resumed after a pause.
    pub resumes: AtomicU64,
    /// Handler call durations in microseconds (for benchmarks).
    pub handle_micros: Option<Mutex<hdrhistogram::Histogram<u64>>>,
    /// Partitions paused for backpressure, since start.
    pub pauses: AtomicU64,
}

impl Stats {
    /// One log line with the counters, for operators without a metrics scraper.
    pub fn log_progress(&self) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info!(
            final_events = g(&self.events_final),
            handled = g(&self.handled),
            outputs = g(&self.outputs),
            dead_lettered = g(&self.dead_lettered),
            retries = g(&self.retries),
            duplicates = g(&self.duplicates),
            fuel_used = g(&self.fuel_used),
            pauses = g(&self.pauses),
            resumes = g(&self.resumes),
            budget_waits = g(&self.budget_waits),
            "progress"
        );
    }

    fn record_handle(&self, d: Duration) {
        if let Some(h) = &self.handle_micros {
            let _ = h.lock().unwrap().record(d.as_micros() as u64);
        }
    }
}

/// What the pipeline reports to operators: spans, metrics, readiness.
#[derive(Clone, Default)]
pub struct Observability {
    pub tracing: Arc<Tracing>,
    /// None when metrics are off (nothing is recorded).
    pub metrics: Option<Arc<Metrics>>,
    pub health: Arc<Health>,
}

impl Observability {
    /// No spans, no metrics (trace context is still propagated).
    pub fn off() -> Self {
        Self::default()
    }

    fn handler_metrics(&self, h: &LoadedHandler) -> HandlerMetrics {
        match &self.metrics {
            Some(m) => m.handler(&h.name, &h.version),
            None => HandlerMetrics::off(),
        }
    }
}

/// Everything a worker and a finalizer need, shared.
struct Shared {
    config: Config,
    publisher: Publisher,
    halt: Halt,
    /// Fault injection for the end-to-end tests: the worker of this
    /// `topic/partition` panics at this offset (`WEIR_FAULT_PANIC_AT`).
    panic_at: Option<(String, i32, i64)>,
    by_topic: HashMap<String, Vec<Arc<LoadedHandler>>>,
    /// Each retry topic, with the dead-letter topic of its source topic
    /// (where a record it cannot route goes).
    retry_topics: HashMap<String, String>,
    dedup: Option<Arc<Dedup>>,
    stats: Arc<Stats>,
    obs: Observability,
    /// Per handler name.
    handler_metrics: HashMap<String, HandlerMetrics>,
}

impl Shared {
    fn tracing(&self) -> &Tracing {
        &self.obs.tracing
    }

    fn kafka_error(&self, operation: &str) {
        if let Some(m) = &self.obs.metrics {
            m.kafka_errors.with_label_values(&[operation]).inc();
        }
    }
}

/// A partition's worker as the poll loop and the rebalance callback see it.
struct Worker {
    tx: Option<mpsc::Sender<Record>>,
    /// Records fetched while the worker's queue was full; fetching of the
    /// partition is paused until they are handed over.
    parked: VecDeque<Record>,
    paused: bool,
    /// Offset of the next record expected, to drop records redelivered by a
    /// pause/resume refetch.
    next_offset: i64,
    /// Set to stop after the event being handled; queued events are left
    /// uncommitted for redelivery.
    stop: Arc<AtomicBool>,
    /// Set to abandon even the acknowledgements being awaited.
    cancel: Arc<AtomicBool>,
    /// Set when the partition stopped for good (a dead letter was refused):
    /// its records are dropped uncommitted until the partition moves.
    stopped: Arc<AtomicBool>,
    done: watch::Receiver<bool>,
    thread: Option<JoinHandle<()>>,
    /// Events handed to this partition's worker (or parked) and not final yet.
    in_flight: Arc<AtomicI64>,
}

impl Worker {
    /// Stops taking records; the event being handled is finished and its
    /// outcome made final, the queued ones are dropped (not committed).
    fn close(&mut self, workers: &Workers) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        let bytes: usize = self.parked.iter().map(record_size).sum();
        workers.parked_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.parked.clear();
    }
}

/// Approximate memory of a record.
fn record_size(r: &Record) -> usize {
    64 + r.topic.len()
        + r.value.len()
        + r.key.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
}

#[derive(Default)]
struct Workers {
    map: Mutex<HashMap<TopicPartition, Worker>>,
    /// Bytes of records parked over all partitions. Pausing a partition is
    /// expensive (librdkafka resumes its fetching only after a delay), so
    /// records beyond a full worker queue are first held here, up to the
    /// prefetch budget, and the partition is paused only past it.
    parked_bytes: std::sync::atomic::AtomicUsize,
    /// Set while the events queued over all partitions exceed the total bound.
    over_total: AtomicBool,
}

/// Commit failures in a row after which the instance is not ready.
const COMMIT_FAILURES_NOT_READY: u32 = 3;

/// The consumer context: flushes revoked partitions before they move,
/// reports joining the group, commit results and consumer lag.
struct WeirContext {
    workers: Arc<Workers>,
    drain_timeout: Duration,
    obs: Observability,
    /// Commits that failed since the last one that succeeded.
    commit_failures: std::sync::atomic::AtomicU32,
}

impl WeirContext {
    fn kafka_error(&self, operation: &str) {
        if let Some(m) = &self.obs.metrics {
            m.kafka_errors.with_label_values(&[operation]).inc();
        }
    }
}

impl ClientContext for WeirContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(m) = &self.obs.metrics {
            m.record_lag(&statistics);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        error!(error = %error, reason, "Kafka consumer error");
        self.kafka_error("consume");
    }
}

impl ConsumerContext for WeirContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut revoked = Vec::new();
        {
            let mut map = self.workers.map.lock().unwrap();
            for e in tpl.elements() {
                if let Some(mut w) = map.remove(&(e.topic().to_owned(), e.partition())) {
                    w.close(&self.workers);
                    if w.stopped.load(Ordering::SeqCst) {
                        // No longer ours: its new owner tries again.
                        self.obs
                            .health
                            .clear_problem(&partition_key(e.topic(), e.partition()));
                        if let Some(m) = &self.obs.metrics {
                            m.stopped_partitions.dec();
                        }
                    }
                    revoked.push(w);
                }
            }
        }
        if !revoked.is_empty() {
            info!(
                partitions = revoked.len(),
                "partitions revoked; finishing their in-flight events"
            );
            let deadline = Instant::now() + self.drain_timeout;
            drain(&mut revoked, deadline);
        }
        commit_sync(base);
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), "partitions assigned");
                self.obs.health.joined.store(true, Ordering::Relaxed);
                // A partition paused before it was revoked stays paused in
                // librdkafka when it comes back; it has no worker yet, so
                // nothing else would resume it.
                if let Err(e) = base.resume(tpl) {
                    warn!(error = %e, "cannot resume assigned partitions");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                error!(error = %e, "consumer group rebalance failed");
                self.kafka_error("rebalance");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                if self.commit_failures.swap(0, Ordering::Relaxed) >= COMMIT_FAILURES_NOT_READY {
                    info!("offset commits succeed again");
                }
                self.obs.health.clear_problem("commit");
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.kafka_error("commit");
                let n = self.commit_failures.fetch_add(1, Ordering::Relaxed) + 1;
                error!(error = %e, failures_in_a_row = n, "offset commit failed");
                if n >= COMMIT_FAILURES_NOT_READY {
                    self.obs.health.set_problem(
                        "commit",
                        format!("{n} offset commits in a row failed, the last with: {e}"),
                    );
                }
            }
        }
    }
}

/// The key of a partition's problem in [`Health`].
fn partition_key(topic: &str, partition: i32) -> String {
    format!("partition {topic}/{partition}")
}

/// Waits for workers' finalizers until `deadline`, then cancels the rest;
/// returns how many were cancelled with events unfinished.
fn drain(workers: &mut [Worker], deadline: Instant) -> usize {
    let wait = |w: &mut Worker| {
        let mut done = w.done.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = async move {
            let _ = tokio::time::timeout(left, done.wait_for(|d| *d)).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => tokio::task::block_in_place(|| h.block_on(fut)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime to wait on")
                .block_on(fut),
        }
    };
    let mut abandoned = 0;
    for w in workers.iter_mut() {
        wait(w);
        if !*w.done.borrow() {
            warn!("in-flight events did not finish in time; they will be redelivered");
            w.cancel.store(true, Ordering::SeqCst);
            abandoned += 1;
        }
    }
    for w in workers.iter_mut() {
        // A cancelled worker stops at its next check; one stuck in a long
        // handler call is left to finish on its own rather than holding up
        // the rebalance.
        if let Some(t) = w.thread.take() {
            if t.is_finished() || *w.done.borrow() {
                let _ = t.join();
            }
        }
    }
    abandoned
}

/// Commits the stored offsets now; failures are counted by the commit
/// callback.
fn commit_sync<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => debug!("offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => error!(error = %e, "offset commit failed"),
    }
}

/// Runs the pipeline until `shutdown` resolves, then drains and commits.
pub async fn run(
    config: Config,
    handlers: Vec<Arc<LoadedHandler>>,
    dedup: Option<Arc<Dedup>>,
    stats: Arc<Stats>,
    obs: Observability,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut by_topic: HashMap<String, Vec<Arc<LoadedHandler>>> = HashMap::new();
    for h in &handlers {
        for t in h
            .topics()
            .iter()
            .cloned()
            .chain(h.config_entry.retry_topics())
        {
            let subscribed = by_topic.entry(t).or_default();
            if !subscribed.iter().any(|s| Arc::ptr_eq(s, h)) {
                subscribed.push(h.clone());
            }
        }
    }
    let (halt, mut halted) = Halt::new(obs.health.clone());
    let publisher = Publisher::new(&config, halt.clone(), obs.metrics.clone())?;
    let workers = Arc::new(Workers::default());
    let context = WeirContext {
        workers: workers.clone(),
        drain_timeout: config.pipeline.drain_timeout(),
        obs: obs.clone(),
        commit_failures: Default::default(),
    };
    let consumer: Arc<StreamConsumer<WeirContext>> = Arc::new(
        consumer_config(&config)
            .create_with_context(context)
            .context("cannot create the Kafka consumer")?,
    );
    ensure_topics(&config, &consumer).await;
    let topics = config.topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .with_context(|| format!("cannot subscribe to {topics:?}"))?;
    info!(group = %config.kafka.group_id, ?topics, handlers = handlers.len(), "consuming");

    let shared = Arc::new(Shared {
        config,
        publisher,
        halt,
        panic_at: std::env::var("WEIR_FAULT_PANIC_AT").ok().and_then(|v| {
            let mut it = v.rsplitn(3, '/');
            let offset = it.next()?.parse().ok()?;
            let partition = it.next()?.parse().ok()?;
            Some((it.next()?.to_owned(), partition, offset))
        }),
        by_topic,
        retry_topics: handlers
            .iter()
            .flat_map(|h| {
                h.topics().iter().filter_map(|source| {
                    let retry = h.config_entry.retry_topic_of(source)?;
                    Some((retry, h.config_entry.dead_letter_topic_of(source)))
                })
            })
            .collect(),
        dedup,
        stats,
        handler_metrics: handlers
            .iter()
            .map(|h| (h.name.clone(), obs.handler_metrics(h)))
            .collect(),
        obs,
    });
    let commit_task = {
        let consumer = consumer.clone();
        let every = shared.config.pipeline.commit_interval();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // The result reaches the commit callback.
                let _ = consumer.commit_consumer_state(CommitMode::Async);
            }
        })
    };

    tokio::pin!(shutdown);
    let mut resume_tick = tokio::time::interval(Duration::from_millis(20));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = halted.changed() => break,
            msg = consumer.recv() => match msg {
                Ok(msg) => dispatch(&shared, &consumer, &workers, Record::from_message(&msg)),
                Err(e) => {
                    error!(error = %e, "consumer error");
                    shared.kafka_error("consume");
                }
            },
            _ = resume_tick.tick() => unpark(&consumer, &workers, &shared),
            _ = stats_tick.tick() => shared.stats.log_progress(),
        }
    }

    let halt_reason = shared.halt.reason();
    shared.obs.health.stopping.store(true, Ordering::Relaxed);
    commit_task.abort();
    let mut all: Vec<Worker> = {
        let mut map = workers.map.lock().unwrap();
        map.drain()
            .map(|(_, mut w)| {
                w.close(&workers);
                w
            })
            .collect()
    };
    // A broken producer finishes nothing more: what is final is committed,
    // the rest is redelivered. Otherwise in-flight events are finished.
    let deadline = if shared.halt.is_immediate() {
        Instant::now()
    } else {
        info!("shutting down: finishing in-flight events");
        Instant::now() + shared.config.pipeline.drain_timeout()
    };
    let abandoned = drain(&mut all, deadline);
    commit_sync(consumer.as_ref());
    shared.stats.log_progress();
    if let Some(reason) = halt_reason {
        anyhow::bail!("stopped: {reason}");
    }
    if abandoned > 0 {
        anyhow::bail!(
            "stopped with the events in hand of {abandoned} partition(s) unfinished after pipeline.drain_timeout_ms; they will be redelivered"
        );
    }
    info!("offsets committed; stopped");
    Ok(())
}

/// Creates missing dead-letter and retry topics with their source topic's
/// partition count, so failures have somewhere to go even where the broker
/// does not create topics on first use. Best effort: a failure is logged,
/// and the partition waits at the first failure if the topic is still missing.
async fn ensure_topics(config: &Config, consumer: &StreamConsumer<WeirContext>) {
    let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(10)) else {
        warn!("cannot read cluster metadata; dead-letter and retry topics are not checked");
        return;
    };
    let partitions = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };
    let mut wanted: Vec<(String, i32)> = Vec::new();
    for h in &config.handlers {
        for source in &h.topics {
            let Some(n) = partitions(source) else {
                continue;
            };
            let dlq = h.dead_letter_topic_of(source);
            for t in std::iter::once(dlq).chain(h.retry_topic_of(source)) {
                if partitions(&t).is_none() && !wanted.iter().any(|(w, _)| *w == t) {
                    wanted.push((t, n));
                }
            }
        }
    }
    if wanted.is_empty() {
        return;
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        match client_config(config, &Default::default()).create() {
            Ok(a) => a,
            Err(e) => return warn!(error = %e, "cannot create an admin client"),
        };
    let new: Vec<rdkafka::admin::NewTopic> = wanted
        .iter()
        .map(|(t, n)| {
            rdkafka::admin::NewTopic::new(t, *n, rdkafka::admin::TopicReplication::Fixed(-1))
        })
        .collect();
    let opts = rdkafka::admin::AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    match admin.create_topics(&new, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(t) => info!(topic = %t, "created topic"),
                    Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        debug!(topic = %t, "topic exists")
                    }
                    Err((t, e)) => warn!(topic = %t, error = %e, "cannot create topic"),
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot create dead-letter/retry topics"),
    }
}

fn tpl_of(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Hands a record to its partition's worker; parks it and pauses the
/// partition when the worker is full.
fn dispatch(
    shared: &Arc<Shared>,
    consumer: &Arc<StreamConsumer<WeirContext>>,
    workers: &Workers,
    record: Record,
) {
    let tp = (record.topic.clone(), record.partition);
    let mut map = workers.map.lock().unwrap();
    let w = map
        .entry(tp.clone())
        .or_insert_with(|| spawn_worker(shared.clone(), consumer, &tp, record.offset));
    if w.stopped.load(Ordering::Relaxed) {
        // Left uncommitted: redelivered once the partition moves or the
        // instance restarts.
        if !w.paused && consumer.pause(&tpl_of(&tp)).is_ok() {
            w.paused = true;
        }
        return;
    }
    if record.offset < w.next_offset {
        return; // already handed over; refetched after a pause
    }
    let Some(tx) = &w.tx else { return };
    w.next_offset = record.offset + 1;
    w.in_flight.fetch_add(1, Ordering::Relaxed);
    let full = workers.over_total.load(Ordering::Relaxed);
    let record = if !w.parked.is_empty() || full {
        record
    } else {
        match tx.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(record)) => record,
            Err(mpsc::error::TrySendError::Closed(_)) => return worker_died(shared, &tp),
        }
    };
    let parked = workers
        .parked_bytes
        .fetch_add(record_size(&record), Ordering::Relaxed)
        + record_size(&record);
    w.parked.push_back(record);
    let budget = shared.config.pipeline.prefetch_kbytes as usize * 1024;
    if !w.paused && (parked >= budget || full) {
        match consumer.pause(&tpl_of(&tp)) {
            Ok(()) => {
                w.paused = true;
                shared.stats.pauses.fetch_add(1, Ordering::Relaxed);
                debug!(topic = %tp.0, partition = tp.1, "partition paused: work in flight at its bound");
            }
            Err(e) => warn!(error = %e, "cannot pause partition"),
        }
    }
}

/// A worker thread that ended while its partition is assigned is a bug
/// (a panic is reported where it happens); carrying on would commit past
/// the events it dropped, so the runtime halts and they are redelivered.
fn worker_died(shared: &Shared, tp: &TopicPartition) {
    shared.halt.halt(format!(
        "the worker of partition {}/{} stopped unexpectedly",
        tp.0, tp.1
    ));
}

/// Whether the events queued over all partitions are over the total
/// bound, with hysteresis: over at the bound, under again at half of it,
/// so partitions do not flap between paused and resumed.
fn over_total(was_over: bool, queued: usize, max_total: usize) -> bool {
    if was_over {
        queued * 2 >= max_total
    } else {
        queued >= max_total
    }
}

/// Whether a paused partition may resume: nothing held back and at least
/// half its worker's queue free.
fn may_resume(parked: usize, free: usize, capacity: usize) -> bool {
    parked == 0 && free * 2 >= capacity
}

/// Moves parked records into workers with room, resuming drained partitions.
fn unpark(consumer: &StreamConsumer<WeirContext>, workers: &Workers, shared: &Shared) {
    let stats = &shared.stats;
    let max_total = shared.config.pipeline.max_in_flight_total;
    let mut map = workers.map.lock().unwrap();
    if let Some(m) = &shared.obs.metrics {
        m.in_flight.set(
            map.values()
                .map(|w| w.in_flight.load(Ordering::Relaxed))
                .sum(),
        );
        m.paused_partitions
            .set(map.values().filter(|w| w.paused).count() as i64);
    }
    let queued: usize = map
        .values()
        .filter_map(|w| w.tx.as_ref().map(|tx| tx.max_capacity() - tx.capacity()))
        .sum();
    let over = over_total(
        workers.over_total.load(Ordering::Relaxed),
        queued,
        max_total,
    );
    workers.over_total.store(over, Ordering::Relaxed);
    if over {
        return;
    }
    for (tp, w) in map.iter_mut() {
        let Some(tx) = &w.tx else { continue };
        if w.stopped.load(Ordering::Relaxed) {
            // Its worker is gone; held records stay uncommitted.
            let bytes: usize = w.parked.drain(..).map(|r| record_size(&r)).sum();
            workers.parked_bytes.fetch_sub(bytes, Ordering::Relaxed);
            continue;
        }
        while let Some(record) = w.parked.pop_front() {
            let size = record_size(&record);
            match tx.try_send(record) {
                Ok(()) => {
                    workers.parked_bytes.fetch_sub(size, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(record)) => {
                    w.parked.push_front(record);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    worker_died(shared, tp);
                    break;
                }
            }
        }
        // Resume once half the queue is free, so a partition does not flap.
        if w.paused && may_resume(w.parked.len(), tx.capacity(), tx.max_capacity()) {
            match consumer.resume(&tpl_of(tp)) {
                Ok(()) => {
                    w.paused = false;
                    stats.resumes.fetch_add(1, Ordering::Relaxed);
                    debug!(topic = %tp.0, partition = tp.1, "partition resumed");
                }
                Err(e) => warn!(error = %e, "cannot resume partition"),
            }
        }
    }
}

/// What a worker hands its finalizer, in the order it handles records.
enum Step {
    /// A record held until it is due (retry partitions): final later.
    Deferred(i64),
    /// A record handled: what must be acknowledged before it is final.
    Done(Pending),
}

/// The outcome of one event: what must be acknowledged before its offset
/// is final.
struct Pending {
    offset: i64,
    deliveries: Vec<Delivery>,
    /// Idempotency keys to mark once the deliveries are acknowledged.
    marks: Vec<Vec<u8>>,
}

/// A record sent for an event, awaited before the event is final.
struct Delivery {
    ack: Ack,
    /// The producer span, ended at the acknowledgement.
    span: Option<TraceContext>,
    /// Counted once acknowledged (outputs or dead letters of a handler).
    counter: Option<IntCounter>,
    /// What a refusal for good means.
    on_refused: OnRefused,
}

/// What the finalizer does when a record is refused for good.
enum OnRefused {
    /// An output or a retry record: the event is dead-lettered for its
    /// handler as `produce-failed`.
    DeadLetter(Arc<Fallback>),
    /// A dead letter to this topic: the partition stops, nothing is
    /// committed past the event.
    Stop(String),
}

/// What dead-lettering an event for one handler takes, should one of the
/// records its call produced be refused.
struct Fallback {
    record: Arc<Record>,
    handler: Arc<LoadedHandler>,
    metrics: HandlerMetrics,
    attempts: u32,
    first_failure: OffsetDateTime,
    correlation_id: String,
    cx: TraceContext,
    /// Marked once the dead letter is acknowledged, when the call's own
    /// mark is not (a retry hop that could not be written).
    mark: Option<Vec<u8>>,
    /// Set once dead-lettered: an event is dead-lettered once per handler.
    used: AtomicBool,
}

fn spawn_worker(
    shared: Arc<Shared>,
    consumer: &Arc<StreamConsumer<WeirContext>>,
    tp: &TopicPartition,
    first_offset: i64,
) -> Worker {
    let capacity = shared.config.pipeline.max_in_flight_per_partition;
    let (tx, rx) = mpsc::channel::<Record>(capacity);
    let (pending_tx, pending_rx) = mpsc::channel::<Step>(capacity);
    let (done_tx, done_rx) = watch::channel(false);
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let handlers = shared.by_topic.get(&tp.0).cloned().unwrap_or_default();
    let in_flight = Arc::new(AtomicI64::new(0));
    debug!(topic = %tp.0, partition = tp.1, first_offset, "starting partition worker");

    let finalizer = Finalizer {
        tp: tp.clone(),
        consumer: consumer.clone(),
        shared: shared.clone(),
        in_flight: in_flight.clone(),
        cancel: cancel.clone(),
        stopped: stopped.clone(),
        closing: stop.clone(),
    };
    {
        let halt = shared.halt.clone();
        let tp = tp.clone();
        tokio::spawn(async move {
            use futures::FutureExt;
            let run = std::panic::AssertUnwindSafe(finalizer.run(pending_rx)).catch_unwind();
            if let Err(panic) = run.await {
                halt.halt(format!(
                    "the finalizer of partition {}/{} panicked: {}",
                    tp.0,
                    tp.1,
                    panic_text(panic.as_ref())
                ));
            }
            let _ = done_tx.send(true);
        });
    }
    let thread = {
        let cancel = cancel.clone();
        let stop = stop.clone();
        let tp = tp.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("weir-{}-{}", tp.0, tp.1))
            .spawn(move || {
                let halt = shared.halt.clone();
                let is_retry = shared.retry_topics.contains_key(&tp.0);
                let worker = PartitionWorker::new(shared, handlers, cancel, is_retry);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.run(rx, pending_tx, &stop, runtime)
                }));
                if let Err(panic) = run {
                    // Noticed at once, not at the partition's next record.
                    let text = panic_text(panic.as_ref());
                    error!(topic = %tp.0, partition = tp.1, panic = %text, "a partition worker panicked");
                    halt.halt(format!(
                        "the worker of partition {}/{} panicked: {text}",
                        tp.0, tp.1
                    ));
                }
            })
            .expect("spawning a worker thread")
    };
    Worker {
        tx: Some(tx),
        parked: VecDeque::new(),
        paused: false,
        next_offset: first_offset,
        stop,
        cancel,
        stopped,
        done: done_rx,
        thread: Some(thread),
        in_flight,
    }
}

/// One partition's finalizer: awaits each event's acknowledgements in the
/// order the worker handled them, marks the events in the idempotency
/// store, then stores the offset below every unfinished event. Events that
/// are ready together are marked in one batch. A record refused for a
/// reason that can pass is sent again; one refused for good dead-letters
/// its event, or, if it is a dead letter, stops the partition, so nothing
/// is committed past an output or dead letter that is not durable.
struct Finalizer {
    tp: TopicPartition,
    consumer: Arc<StreamConsumer<WeirContext>>,
    shared: Arc<Shared>,
    in_flight: Arc<AtomicI64>,
    cancel: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    /// Set when the partition is revoked or the instance shuts down.
    closing: Arc<AtomicBool>,
}

impl Finalizer {
    async fn run(self, mut steps: mpsc::Receiver<Step>) {
        const BATCH: usize = 512;
        let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
        let mut offsets = Offsets::default();
        let mut deferred: Vec<i64> = Vec::new();
        while let Some(first) = steps.recv().await {
            let mut next = Some(first);
            while let Some(step) = next.take() {
                match step {
                    Step::Deferred(offset) => deferred.push(offset),
                    Step::Done(p) => batch.push(p),
                }
                if batch.len() < BATCH {
                    next = steps.try_recv().ok();
                }
            }
            for offset in deferred.drain(..) {
                offsets.defer(offset);
            }
            // Events settle in order; a stop or an abandon cuts the batch:
            // the events before it are final all the same.
            let mut cut: Option<(usize, Option<String>)> = None;
            'settle: for (i, p) in batch.iter_mut().enumerate() {
                for delivery in std::mem::take(&mut p.deliveries) {
                    match self.settle(delivery).await {
                        Settled::Done(mark) => p.marks.extend(mark),
                        Settled::Stop(reason) => {
                            cut = Some((i, Some(reason)));
                            break 'settle;
                        }
                        Settled::Abandoned => {
                            cut = Some((i, None));
                            break 'settle;
                        }
                    }
                }
            }
            let stop_at = cut.as_ref().map(|(i, _)| batch[*i].offset);
            if let Some((i, _)) = &cut {
                batch.truncate(*i);
            }
            if !self.finish(&mut batch, &mut offsets).await {
                break;
            }
            match cut {
                None => {}
                Some((_, Some(reason))) => {
                    self.stop(stop_at.expect("a cut event"), reason);
                    break;
                }
                Some((_, None)) => break,
            }
        }
    }

    /// Marks settled events in the idempotency store, then stores the
    /// offset below every unfinished event. False when cancelled before
    /// the marks were written.
    async fn finish(&self, batch: &mut Vec<Pending>, offsets: &mut Offsets) -> bool {
        if batch.is_empty() {
            return true;
        }
        if let Some(dedup) = &self.shared.dedup {
            let keys = batch.iter().flat_map(|p| p.marks.iter().map(Vec::as_slice));
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = dedup.mark(keys.clone()) {
                // Committing without the marks would let duplicates through
                // after a crash: wait for the store instead.
                error!(error = %format!("{e:#}"), "cannot mark events as processed; retrying");
                if self.cancel.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        for p in batch.iter() {
            offsets.finish(p.offset);
        }
        if let Some(offset) = offsets.storable() {
            if let Err(e) = self.consumer.store_offset(&self.tp.0, self.tp.1, offset) {
                if self.cancel.load(Ordering::SeqCst) {
                    // Abandoned in a rebalance: the partition is no longer
                    // ours, and its new owner starts from the last commit.
                    debug!(topic = %self.tp.0, partition = self.tp.1, offset, error = %e, "offset not stored");
                } else {
                    warn!(topic = %self.tp.0, partition = self.tp.1, offset, error = %e, "offset not stored");
                    self.shared.kafka_error("store_offset");
                }
            }
        }
        self.shared
            .stats
            .events_final
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.in_flight
            .fetch_sub(batch.len() as i64, Ordering::Relaxed);
        batch.clear();
        true
    }

    /// Awaits one record; on a refusal for good, does what its event needs.
    async fn settle(&self, delivery: Delivery) -> Settled {
        let shared = &self.shared;
        match shared
            .publisher
            .acknowledged(delivery.ack, &self.cancel, delivery.span.as_ref())
            .await
        {
            Acked::Yes => {
                shared.stats.outputs.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = delivery.counter {
                    c.inc();
                }
                if let Some(span) = delivery.span {
                    telemetry::end(&span);
                }
                Settled::Done(None)
            }
            Acked::Abandoned => Settled::Abandoned,
            Acked::Refused(reason) => {
                if let Some(span) = &delivery.span {
                    telemetry::end(span);
                }
                match delivery.on_refused {
                    OnRefused::Stop(topic) => Settled::Stop(format!(
                        "the dead-letter topic {topic} refused a record for good: {reason}"
                    )),
                    OnRefused::DeadLetter(f) => {
                        if f.used.swap(true, Ordering::SeqCst) {
                            return Settled::Done(None);
                        }
                        let Some(d) = self.dead_letter(&f, &reason).await else {
                            return Settled::Abandoned;
                        };
                        match Box::pin(self.settle(d)).await {
                            Settled::Done(_) => Settled::Done(f.mark.clone()),
                            other => other,
                        }
                    }
                }
            }
        }
    }

    /// The dead letter of an event one of whose records was refused.
    /// None when cancelled before it was enqueued.
    async fn dead_letter(&self, f: &Fallback, reason: &str) -> Option<Delivery> {
        let shared = &self.shared;
        let h = &f.handler;
        let topic = h.config_entry.dead_letter_topic_of(&f.record.topic);
        let message = format!("the broker refused a record of this event for good: {reason}");
        warn!(trace_id = %telemetry::trace_id(&f.cx), handler = %h.name,
            correlation_id = %f.correlation_id, topic = %f.record.topic,
            partition = f.record.partition, offset = f.record.offset,
            reason = %message, dead_letter_topic = %topic, "event dead-lettered: produce failed");
        f.metrics.failed(FailureKind::ProduceFailed, None);
        let dl = DeadLetter {
            record: &f.record,
            kind: FailureKind::ProduceFailed,
            message,
            handler: h.name.clone(),
            handler_version: h.version.clone(),
            attempts: f.attempts,
            group_id: &shared.config.kafka.group_id,
            first_failure: f.first_failure,
            last_failure: OffsetDateTime::now_utc(),
        };
        let mut produce = dl.into_produce(topic.clone());
        let span = publish_span(
            shared.tracing(),
            &f.cx,
            &mut produce,
            &f.correlation_id,
            Some(FailureKind::ProduceFailed.name()),
        );
        shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let ack = shared.publisher.send_now(&produce, &self.cancel).await?;
        Some(Delivery {
            ack,
            span,
            counter: f.metrics.dead_letter_counter(),
            on_refused: OnRefused::Stop(topic),
        })
    }

    /// Stops the partition for good: the worker stops, its records are left
    /// uncommitted, and the instance is not ready until the partition moves.
    fn stop(&self, offset: i64, reason: String) {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        error!(topic = %topic, partition, offset, reason = %reason,
            "partition stopped: nothing past this event is committed until the cause is fixed and the partition moves or the instance restarts");
        self.stopped.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        // Its queued events are dropped uncommitted.
        self.in_flight.store(0, Ordering::Relaxed);
        if self.closing.load(Ordering::SeqCst) {
            // Being revoked or shut down: the partition is not ours to
            // report on any more.
            return;
        }
        self.shared.obs.health.set_problem(
            &partition_key(topic, partition),
            format!("partition {topic}/{partition} stopped at offset {offset}: {reason}"),
        );
        if let Some(m) = &self.shared.obs.metrics {
            m.stopped_partitions.inc();
        }
    }
}

/// How one record's delivery ended for its event.
enum Settled {
    /// Acknowledged (or dead-lettered instead): maybe one more key to mark.
    Done(Option<Vec<u8>>),
    /// A dead letter was refused for good.
    Stop(String),
    /// Cancelled or halting.
    Abandoned,
}

/// Starts the producer span of a record sent on behalf of the span in `cx`
/// and writes its context into the record's headers, so whoever consumes
/// the record continues the trace.
fn publish_span(
    tracing: &Tracing,
    cx: &TraceContext,
    p: &mut Produce,
    correlation_id: &str,
    dead_letter_reason: Option<&str>,
) -> Option<TraceContext> {
    let span = tracing.start(cx, || {
        telemetry::producer_span(p, correlation_id, dead_letter_reason)
    });
    tracing.inject(&span, &mut p.headers);
    tracing.enabled().then_some(span)
}

/// Handles one partition's events, in order, on its own thread.
struct PartitionWorker {
    shared: Arc<Shared>,
    handlers: Vec<(Arc<LoadedHandler>, Option<HandlerInstance>, HandlerMetrics)>,
    cancel: Arc<AtomicBool>,
    /// Keys handled by this worker whose marks may not be written yet: a
    /// duplicate close behind its original is caught here.
    recent: RecentKeys,
    /// The producer's record size limit (`message.max.bytes`).
    max_record_bytes: usize,
    /// Time the current event waited for its handler's fuel budget.
    throttled: Duration,
    /// The partition is of a retry topic: records carry retry state and
    /// wait in `delayed` until they are due.
    is_retry: bool,
    delayed: DelayQueue<Record>,
}

/// A bounded set of recently handled idempotency keys, oldest evicted
/// first. Keys are kept as 128-bit digests, so memory does not depend on
/// the length of event ids.
struct RecentKeys {
    capacity: usize,
    set: std::collections::HashSet<[u8; 16]>,
    order: VecDeque<[u8; 16]>,
}

impl RecentKeys {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            set: Default::default(),
            order: VecDeque::new(),
        }
    }

    fn digest(key: &[u8]) -> [u8; 16] {
        use sha2::Digest;
        let d = sha2::Sha256::digest(key);
        d[..16].try_into().expect("16 bytes")
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.set.contains(&Self::digest(key))
    }

    fn insert(&mut self, key: &[u8]) {
        let d = Self::digest(key);
        if self.set.insert(d) {
            self.order.push_back(d);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// What became of one handler's call for one event.
enum Verdict {
    Outputs(Vec<Produce>),
    /// Retriable in `topic` mode: send to the retry topic for `attempt`.
    Retry {
        attempt: u32,
        delay: Duration,
        message: String,
        first_failure: OffsetDateTime,
    },
    Failed {
        kind: FailureKind,
        message: String,
        attempts: u32,
        first_failure: OffsetDateTime,
    },
}

impl PartitionWorker {
    fn new(
        shared: Arc<Shared>,
        handlers: Vec<Arc<LoadedHandler>>,
        cancel: Arc<AtomicBool>,
        is_retry: bool,
    ) -> Self {
        Self {
            handlers: handlers
                .into_iter()
                .map(|h| {
                    let m = shared
                        .handler_metrics
                        .get(&h.name)
                        .cloned()
                        .unwrap_or_default();
                    (h, None, m)
                })
                .collect(),
            // What the finalizer may hold unmarked: its queue and one batch.
            recent: RecentKeys::new(shared.config.pipeline.max_in_flight_per_partition + 1024),
            max_record_bytes: shared
                .config
                .kafka
                .producer_options
                .get("message.max.bytes")
                .or(shared.config.kafka.options.get("message.max.bytes"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000),
            shared,
            cancel,
            throttled: Duration::ZERO,
            is_retry,
            delayed: DelayQueue::default(),
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Record>,
        pending: mpsc::Sender<Step>,
        stop: &AtomicBool,
        runtime: tokio::runtime::Handle,
    ) {
        // Retry records held until due; beyond this many the worker waits
        // for the soonest instead of taking more.
        let max_delayed = self.shared.config.pipeline.max_in_flight_per_partition;
        loop {
            if stop.load(Ordering::SeqCst) || self.cancel.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            let record = if let Some(due) = self.delayed.pop_due(now) {
                due
            } else {
                let record = match self.delayed.next_due() {
                    None => match rx.blocking_recv() {
                        Some(r) => r,
                        None => break,
                    },
                    Some(due) => {
                        let wait = due.saturating_duration_since(now);
                        if self.delayed.len() >= max_delayed {
                            self.sleep(wait.min(Duration::from_millis(100)));
                            continue;
                        }
                        let wait = wait.min(Duration::from_millis(100));
                        // The timer is made inside the runtime's context.
                        let next =
                            runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
                        match next {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(_) => continue,
                        }
                    }
                };
                if stop.load(Ordering::SeqCst) || self.cancel.load(Ordering::SeqCst) {
                    break;
                }
                if let Some(due) = self.not_due(&record) {
                    // Later records that are due sooner go first.
                    if pending
                        .blocking_send(Step::Deferred(record.offset))
                        .is_err()
                    {
                        break;
                    }
                    self.delayed.push(due, record);
                    continue;
                }
                record
            };
            if let Some((t, p, o)) = &self.shared.panic_at {
                if record.topic == *t && record.partition == *p && record.offset == *o {
                    panic!("injected fault: the worker of {t}/{p} panics at offset {o}");
                }
            }
            let Some(p) = self.process(record) else {
                break;
            };
            if pending.blocking_send(Step::Done(p)).is_err() {
                break;
            }
        }
    }

    /// When a retry record that is not due yet will be; None for one that
    /// is due, or that is not a retry record.
    fn not_due(&self, record: &Record) -> Option<Instant> {
        if !self.is_retry {
            return None;
        }
        let (_, info) = retry_topic::take_retry(record)?;
        // Never longer than the longest backoff of the handler it names.
        let cap = self
            .handlers
            .iter()
            .find(|(h, _, _)| h.name == info.handler)
            .map_or(0, |(h, _, _)| h.config_entry.max_backoff_ms);
        let due = retry_topic::due_at(&info, Duration::from_millis(cap));
        (due > Instant::now()).then_some(due)
    }

    /// Runs every subscribed handler on one record and enqueues what they
    /// produced or the dead letters. None when cancelled.
    /// Whether `key` already has a final outcome. A store that cannot be
    /// read is waited for: guessing either way would break a promise.
    fn already_done(&self, key: &[u8]) -> Option<bool> {
        let dedup = self.shared.dedup.as_ref()?;
        if self.recent.contains(key) {
            return Some(true);
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match dedup.contains(key) {
                Ok(found) => return Some(found),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot read the idempotency store; retrying");
                    if !self.sleep(backoff) {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn process(&mut self, consumed: Record) -> Option<Pending> {
        // Retry state is honoured only on retry topics; elsewhere the
        // headers are ordinary headers.
        let retry = if self.is_retry {
            retry_topic::take_retry(&consumed)
        } else {
            None
        };
        let offset = consumed.offset;
        if self.is_retry && retry.is_none() {
            let parent = self.shared.tracing().extract(&consumed.headers);
            let d = self.dead_letter_unrouted(
                &consumed,
                &parent,
                "a record in a retry topic without valid retry headers",
            )?;
            return Some(Pending {
                offset,
                deliveries: vec![d],
                marks: Vec::new(),
            });
        }
        let (record_arc, retry, consumed) = match retry {
            Some((original, info)) => (Arc::new(original), Some(info), Some(consumed)),
            None => (Arc::new(consumed), None, None),
        };
        let record: &Record = &record_arc;
        let retry = retry.as_ref();
        // The context the event arrived with (for a retry record: the
        // context of the span that sent it to the retry topic).
        let parent = self.shared.tracing().extract(&record.headers);
        let mut deliveries = Vec::new();
        let mut marks = Vec::new();
        let shared = self.shared.clone();
        let group = shared.config.kafka.group_id.as_str();
        let dedup_on = shared.dedup.is_some();
        let done = |deliveries, marks| {
            Some(Pending {
                offset,
                deliveries,
                marks,
            })
        };
        let mut event = match envelope::decode(record) {
            Ok(event) => event,
            Err(undecodable) => {
                let position = replay::position_id(record);
                let keys: Vec<Vec<u8>> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| {
                        dedup::key(&h.name, &replay::dedup_id(&position, record, &h.name))
                    })
                    .collect();
                if let (true, Some(first)) = (dedup_on, keys.first()) {
                    if self.already_done(first)? {
                        self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        if let Some((_, _, m)) = self.handlers.first() {
                            m.duplicate();
                        }
                        return done(deliveries, marks);
                    }
                    for k in &keys {
                        self.recent.insert(k);
                    }
                    marks = keys;
                }
                let names: Vec<&str> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| h.name.as_str())
                    .collect();
                let versions: Vec<&str> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| h.version.as_str())
                    .collect();
                let topic = self.handlers.first().map_or_else(
                    || deadletter::default_topic(&record.topic),
                    |(h, _, _)| h.config_entry.dead_letter_topic_of(&record.topic),
                );
                let handler = names.join(",");
                let cx = self.shared.tracing().start(&parent, || {
                    telemetry::consumer_span(record, None, &handler, &versions.join(","), group)
                });
                telemetry::fail(&cx, FailureKind::Undecodable.name(), &undecodable.0);
                warn!(trace_id = %telemetry::trace_id(&cx), topic = %record.topic, partition = record.partition,
                    offset = record.offset, handler = %handler, reason = %undecodable,
                    dead_letter_topic = %topic, "undecodable event dead-lettered");
                // Counted against the handler whose dead-letter topic takes it.
                let metrics = self
                    .handlers
                    .first()
                    .map(|(_, _, m)| m.clone())
                    .unwrap_or_default();
                metrics.failed(FailureKind::Undecodable, None);
                let now = OffsetDateTime::now_utc();
                let dl = DeadLetter {
                    record,
                    kind: FailureKind::Undecodable,
                    message: undecodable.0,
                    handler: handler.clone(),
                    handler_version: versions.join(","),
                    attempts: 1,
                    group_id: group,
                    first_failure: now,
                    last_failure: now,
                };
                let correlation = record
                    .header_str(envelope::header::CORRELATION_ID)
                    .unwrap_or_default();
                deliveries.push(self.send_dead_letter(
                    dl,
                    topic,
                    &cx,
                    metrics.dead_letter_counter(),
                    &correlation,
                )?);
                telemetry::end(&cx);
                return done(deliveries, marks);
            }
        };
        if record.header(replay::REPLAY_HEADER).is_some() && event.id == record.position_id() {
            // A replayed event without an envelope id keeps its first one.
            event.id = replay::position_id(record);
        }
        // An event that starts a trace and goes to several handlers gets one
        // `receive` span over theirs, so it is one trace, not one per handler.
        let receive = (self.handlers.len() > 1
            && self.shared.tracing().enabled()
            && !opentelemetry::trace::TraceContextExt::span(&parent)
                .span_context()
                .is_valid())
        .then(|| {
            self.shared.tracing().start(&parent, || {
                let (_, kind, attributes) =
                    telemetry::consumer_span(record, Some(&event), "", "", group);
                (format!("receive {}", record.topic), kind, attributes)
            })
        });
        let parent = receive.clone().unwrap_or(parent);
        let mut routed = false;
        for i in 0..self.handlers.len() {
            let handler = self.handlers[i].0.clone();
            let metrics = self.handlers[i].2.clone();
            if !handler.config_entry.accepts(&event.event_type)
                || retry.is_some_and(|r| r.handler != handler.name)
            {
                continue;
            }
            routed = true;
            let cx = self.shared.tracing().start(&parent, || {
                telemetry::consumer_span(
                    record,
                    Some(&event),
                    &handler.name,
                    &handler.version,
                    group,
                )
            });
            let id = replay::dedup_id(&event.id, record, &handler.name);
            let key = dedup::key(&handler.name, &id);
            if dedup_on && self.already_done(&key)? {
                debug!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                    correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                    topic = %record.topic, partition = record.partition, offset = record.offset,
                    "duplicate skipped");
                telemetry::event(&cx, || ("duplicate skipped", Vec::new()));
                self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics.duplicate();
                continue;
            }
            // In topic retry mode, this attempt may already have been handed
            // on to the retry topic before a crash: one retry chain only.
            let consumed_attempt = retry.map_or(1, |r| r.attempt);
            let hop = (dedup_on && handler.config_entry.retry_mode == RetryMode::Topic)
                .then(|| dedup::key(&handler.name, &retry_topic::hop_id(&id, consumed_attempt)));
            if let Some(hop) = &hop {
                if self.already_done(hop)? {
                    debug!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempt = consumed_attempt, "retry already scheduled; skipped");
                    telemetry::event(&cx, || ("retry already scheduled", Vec::new()));
                    continue;
                }
            }
            let started = Instant::now();
            self.throttled = Duration::ZERO;
            let verdict = self.call(i, &event, record, retry, &cx)?;
            // Waiting for the fuel budget is throttling, not handling.
            let took = started.elapsed().saturating_sub(self.throttled);
            let fallback = |mark: Option<Vec<u8>>, attempts: u32, first_failure| {
                OnRefused::DeadLetter(Arc::new(Fallback {
                    record: record_arc.clone(),
                    handler: handler.clone(),
                    metrics: metrics.clone(),
                    attempts,
                    first_failure,
                    correlation_id: event.correlation_id.clone(),
                    cx: cx.clone(),
                    mark,
                    used: AtomicBool::new(false),
                }))
            };
            let final_key = dedup_on.then(|| key.clone());
            match (&verdict, hop) {
                (Verdict::Retry { .. }, Some(hop)) => {
                    self.recent.insert(&hop);
                    marks.push(hop);
                }
                (Verdict::Retry { .. }, None) => {}
                _ if dedup_on => {
                    self.recent.insert(&key);
                    marks.push(key);
                }
                _ => {}
            }
            match verdict {
                Verdict::Outputs(outputs) => {
                    debug!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                        correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        outputs = outputs.len(), "handled");
                    let on_refused = (!outputs.is_empty())
                        .then(|| fallback(None, consumed_attempt, OffsetDateTime::now_utc()));
                    for mut o in outputs {
                        let span = publish_span(
                            self.shared.tracing(),
                            &cx,
                            &mut o,
                            &event.correlation_id,
                            None,
                        );
                        let on_refused = match &on_refused {
                            Some(OnRefused::DeadLetter(f)) => OnRefused::DeadLetter(f.clone()),
                            _ => unreachable!("outputs have a fallback"),
                        };
                        deliveries.push(Delivery {
                            ack: self.shared.publisher.send(&o, &self.cancel)?,
                            span,
                            counter: metrics.output_counter(),
                            on_refused,
                        });
                    }
                    self.shared.stats.handled.fetch_add(1, Ordering::Relaxed);
                    metrics.handled(took);
                }
                Verdict::Retry {
                    attempt,
                    delay,
                    message,
                    first_failure,
                } => {
                    let topic = handler
                        .config_entry
                        .retry_topic_of(&record.topic)
                        .expect("topic retry mode has a retry topic");
                    debug!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                        correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempt, ?delay, reason = %message, retry_topic = %topic, "sent to the retry topic");
                    telemetry::event(&cx, || {
                        (
                            "retry scheduled",
                            vec![
                                KeyValue::new(attr::ATTEMPT, attempt as i64),
                                KeyValue::new("weir.retry.delay_ms", delay.as_millis() as i64),
                                KeyValue::new("weir.retry.reason", message.clone()),
                            ],
                        )
                    });
                    let mut p = retry_topic::retry_record(
                        record,
                        &event.correlation_id,
                        &handler.name,
                        attempt,
                        delay,
                        first_failure,
                        topic,
                    );
                    let span = publish_span(
                        self.shared.tracing(),
                        &cx,
                        &mut p,
                        &event.correlation_id,
                        None,
                    );
                    deliveries.push(Delivery {
                        ack: self.shared.publisher.send(&p, &self.cancel)?,
                        span,
                        counter: None,
                        on_refused: fallback(final_key, attempt - 1, first_failure),
                    });
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    metrics.sent_to_retry(took);
                }
                Verdict::Failed {
                    kind,
                    message,
                    attempts,
                    first_failure,
                } => {
                    let topic = handler.config_entry.dead_letter_topic_of(&record.topic);
                    telemetry::fail(&cx, kind.name(), &message);
                    warn!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                        correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                        topic = %record.topic,
                        partition = record.partition, offset = record.offset, kind = %kind,
                        reason = %message, attempts, dead_letter_topic = %topic, "event dead-lettered");
                    metrics.failed(kind, Some(took));
                    let dl = DeadLetter {
                        record,
                        kind,
                        message,
                        handler: handler.name.clone(),
                        handler_version: handler.version.clone(),
                        attempts,
                        group_id: group,
                        first_failure,
                        last_failure: OffsetDateTime::now_utc(),
                    };
                    deliveries.push(self.send_dead_letter(
                        dl,
                        topic,
                        &cx,
                        metrics.dead_letter_counter(),
                        &event.correlation_id,
                    )?);
                }
            }
            telemetry::end(&cx);
        }
        if let (false, Some(info)) = (routed, retry) {
            // The handler was renamed, removed or no longer takes this
            // event type: dead-letter rather than drop it.
            let message = format!(
                "retry record for handler {:?}, which no longer handles {} events of {}",
                info.handler, event.event_type, record.topic
            );
            let consumed = consumed.as_ref().unwrap_or(record);
            deliveries.push(self.dead_letter_unrouted(consumed, &parent, &message)?);
        }
        if let Some(cx) = receive {
            telemetry::end(&cx);
        }
        done(deliveries, marks)
    }

    /// Dead-letters a record no handler can take.
    fn dead_letter_unrouted(
        &mut self,
        record: &Record,
        parent: &TraceContext,
        message: &str,
    ) -> Option<Delivery> {
        let topic = self
            .shared
            .retry_topics
            .get(&record.topic)
            .cloned()
            .unwrap_or_else(|| deadletter::default_topic(&record.topic));
        let group = self.shared.config.kafka.group_id.clone();
        let cx = self.shared.tracing().start(parent, || {
            telemetry::consumer_span(record, None, "", "", &group)
        });
        telemetry::fail(&cx, FailureKind::Undecodable.name(), message);
        error!(trace_id = %telemetry::trace_id(&cx), handler = "", topic = %record.topic, partition = record.partition,
            offset = record.offset, reason = message, dead_letter_topic = %topic,
            "unroutable record dead-lettered");
        let now = OffsetDateTime::now_utc();
        let dl = DeadLetter {
            record,
            kind: FailureKind::Undecodable,
            message: message.to_owned(),
            handler: String::new(),
            handler_version: String::new(),
            attempts: 1,
            group_id: &group,
            first_failure: now,
            last_failure: now,
        };
        let counter = self.shared.obs.metrics.as_ref().map(|m| m.unrouted());
        let d = self.send_dead_letter(dl, topic, &cx, counter, "");
        telemetry::end(&cx);
        d
    }

    /// Publishes a dead letter (its acknowledgement makes the event final).
    fn send_dead_letter(
        &self,
        dl: DeadLetter<'_>,
        topic: String,
        cx: &TraceContext,
        counter: Option<IntCounter>,
        correlation_id: &str,
    ) -> Option<Delivery> {
        let kind = dl.kind;
        let mut produce = dl.into_produce(topic.clone());
        let span = publish_span(
            self.shared.tracing(),
            cx,
            &mut produce,
            correlation_id,
            Some(kind.name()),
        );
        self.shared
            .stats
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        Some(Delivery {
            ack: self.shared.publisher.send(&produce, &self.cancel)?,
            span,
            counter,
            on_refused: OnRefused::Stop(topic),
        })
    }

    /// Calls handler `i`, retrying `retriable` failures with exponential
    /// backoff and full jitter, in place (the partition waits, in order).
    /// Each attempt is a child span of `cx`.
    fn call(
        &mut self,
        i: usize,
        event: &envelope::Event,
        record: &Record,
        retry: Option<&RetryInfo>,
        cx: &TraceContext,
    ) -> Option<Verdict> {
        let handler = self.handlers[i].0.clone();
        let metrics = self.handlers[i].2.clone();
        let mut first_failure = retry.map(|r| r.first_failure);
        let mut attempt = retry.map_or(1, |r| r.attempt);
        let trace_id = telemetry::trace_id(cx);
        loop {
            let instance = match &mut self.handlers[i].1 {
                Some(inst) => inst,
                slot => match handler.instantiate() {
                    Ok(inst) => slot.insert(inst),
                    Err(e) => {
                        // Instantiation was checked at load; failing now is a
                        // resource problem: treat like a trap of this event.
                        return Some(Verdict::Failed {
                            kind: FailureKind::Trap,
                            message: format!("cannot instantiate handler: {e:#}"),
                            attempts: attempt,
                            first_failure: OffsetDateTime::now_utc(),
                        });
                    }
                },
            };
            if let Some(budget) = handler.budget() {
                // Spent budget: this partition waits (and, its queue full,
                // pauses), so an expensive handler slows only its own input.
                loop {
                    let wait = budget.wait_time();
                    if wait.is_zero() {
                        break;
                    }
                    self.shared
                        .stats
                        .budget_waits
                        .fetch_add(1, Ordering::Relaxed);
                    if !sleep_cancellable(&self.cancel, wait) {
                        return None;
                    }
                    self.throttled += wait;
                }
            }
            let call_cx = self.shared.tracing().start(cx, || {
                (
                    format!("call {}", handler.name),
                    SpanKind::Internal,
                    vec![
                        KeyValue::new(attr::HANDLER, handler.name.clone()),
                        KeyValue::new(attr::ATTEMPT, attempt as i64),
                    ],
                )
            });
            let started = Instant::now();
            let outcome = instance.call(event, record, attempt, &trace_id);
            self.shared.stats.record_handle(started.elapsed());
            let fuel = instance.last_fuel_used();
            self.shared
                .stats
                .fuel_used
                .fetch_add(fuel, Ordering::Relaxed);
            metrics.fuel(fuel);
            telemetry::set(&call_cx, || KeyValue::new(attr::FUEL, fuel as i64));
            match &outcome {
                CallOutcome::Ok(_) => {}
                CallOutcome::Failed(kind, message) => {
                    telemetry::fail(&call_cx, kind.name(), message)
                }
                CallOutcome::Retriable(message) => telemetry::fail(&call_cx, "retriable", message),
            }
            telemetry::end(&call_cx);
            if let Some(budget) = handler.budget() {
                budget.debit(fuel);
            }
            if instance.is_poisoned() {
                self.handlers[i].1 = None;
            }
            let failed_at = *first_failure.get_or_insert_with(OffsetDateTime::now_utc);
            match outcome {
                CallOutcome::Ok(outputs) => {
                    let mut produced = Vec::with_capacity(outputs.len());
                    for o in outputs {
                        match envelope::encode_output(o, event, self.max_record_bytes) {
                            Ok(p) => produced.push(p),
                            Err(message) => {
                                return Some(Verdict::Failed {
                                    kind: FailureKind::InvalidOutput,
                                    message,
                                    attempts: attempt,
                                    first_failure: failed_at,
                                })
                            }
                        }
                    }
                    return Some(Verdict::Outputs(produced));
                }
                CallOutcome::Failed(kind, message) => {
                    return Some(Verdict::Failed {
                        kind,
                        message,
                        attempts: attempt,
                        first_failure: failed_at,
                    })
                }
                CallOutcome::Retriable(message) => {
                    if attempt >= handler.config_entry.max_attempts {
                        return Some(Verdict::Failed {
                            kind: FailureKind::RetriesExhausted,
                            message,
                            attempts: attempt,
                            first_failure: failed_at,
                        });
                    }
                    let delay = handler.backoff(attempt);
                    if handler.config_entry.retry_mode == RetryMode::Topic {
                        return Some(Verdict::Retry {
                            attempt: attempt + 1,
                            delay,
                            message,
                            first_failure: failed_at,
                        });
                    }
                    debug!(trace_id = %trace_id, handler = %handler.name, event_id = %event.id,
                        correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempt, ?delay, reason = %message, "retrying");
                    telemetry::event(cx, || {
                        (
                            "retry",
                            vec![
                                KeyValue::new(attr::ATTEMPT, attempt as i64 + 1),
                                KeyValue::new("weir.retry.delay_ms", delay.as_millis() as i64),
                                KeyValue::new("weir.retry.reason", message.clone()),
                            ],
                        )
                    });
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    metrics.retried();
                    if !self.sleep(delay) {
                        return None;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Sleeps for a backoff; false when cancelled meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        sleep_cancellable(&self.cancel, d)
    }
}

/// Sleeps for `d` in slices, so a cancel is noticed; false when cancelled.
fn sleep_cancellable(cancel: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_bound_has_hysteresis() {
        assert!(!over_total(false, 99, 100));
        assert!(over_total(false, 100, 100), "over at the bound");
        assert!(over_total(true, 60, 100), "still over above half");
        assert!(over_total(true, 50, 100));
        assert!(!over_total(true, 49, 100), "under again below half");
    }

    #[test]
    fn a_partition_resumes_only_with_nothing_held_and_half_its_queue_free() {
        assert!(!may_resume(1, 1000, 1000), "records still held");
        assert!(!may_resume(0, 499, 1000));
        assert!(may_resume(0, 500, 1000));
    }

    /// A worker as `drain` sees it, whose finalizer is done or never ends.
    fn worker(done: bool) -> (Worker, watch::Sender<bool>) {
        let (done_tx, done_rx) = watch::channel(done);
        let w = Worker {
            tx: None,
            parked: VecDeque::new(),
            paused: false,
            next_offset: 0,
            stop: Default::default(),
            cancel: Default::default(),
            stopped: Default::default(),
            done: done_rx,
            thread: None,
            in_flight: Default::default(),
        };
        (w, done_tx)
    }

    #[test]
    fn drain_waits_for_finishing_workers_and_cancels_the_rest_at_the_deadline() {
        let (finished, _a) = worker(true);
        let (late, late_tx) = worker(false);
        let (stuck, _c) = worker(false);
        // One finishes while drain waits.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = late_tx.send(true);
        });
        let mut all = vec![finished, late, stuck];
        let started = Instant::now();
        let abandoned = drain(&mut all, Instant::now() + Duration::from_millis(500));
        assert_eq!(abandoned, 1);
        assert!(!all[0].cancel.load(Ordering::SeqCst));
        assert!(
            !all[1].cancel.load(Ordering::SeqCst),
            "finished before the deadline"
        );
        assert!(
            all[2].cancel.load(Ordering::SeqCst),
            "cancelled at the deadline"
        );
        assert!(started.elapsed() >= Duration::from_millis(450));
    }

    fn context() -> (WeirContext, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let obs = Observability {
            metrics: Some(metrics.clone()),
            ..Observability::off()
        };
        obs.health.handlers_loaded.store(true, Ordering::Relaxed);
        obs.health.joined.store(true, Ordering::Relaxed);
        let cx = WeirContext {
            workers: Default::default(),
            drain_timeout: Duration::from_secs(1),
            obs,
            commit_failures: Default::default(),
        };
        (cx, metrics)
    }

    #[test]
    fn repeated_commit_failures_make_the_instance_not_ready_until_one_succeeds() {
        let (cx, metrics) = context();
        let tpl = TopicPartitionList::new();
        let failed = || {
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RequestTimedOut,
            ))
        };
        cx.commit_callback(failed(), &tpl);
        cx.commit_callback(failed(), &tpl);
        assert!(
            cx.obs.health.not_ready().is_none(),
            "two failures are tolerated"
        );
        cx.commit_callback(failed(), &tpl);
        let why = cx.obs.health.not_ready().expect("not ready after three");
        assert!(why.contains("3 offset commits in a row failed"), "{why}");
        assert!(metrics
            .render()
            .contains("weir_kafka_errors_total{operation=\"commit\"} 3"));
        cx.commit_callback(
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            &tpl,
        );
        assert!(
            cx.obs.health.not_ready().is_some(),
            "nothing to commit is no success"
        );
        cx.commit_callback(Ok(()), &tpl);
        assert!(cx.obs.health.not_ready().is_none());
    }

    #[test]
    fn recent_keys_forget_the_oldest_past_capacity() {
        let mut recent = RecentKeys::new(2);
        for k in [b"a", b"b", b"c"] {
            recent.insert(k);
        }
        assert!(!recent.contains(b"a"));
        assert!(recent.contains(b"b") && recent.contains(b"c"));
    }
}
