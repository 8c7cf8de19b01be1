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
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, RetryMode};
use crate::kafka::{client_config, consumer_config, producer_config};
use crate::deadletter::{self, DeadLetter};
use crate::dedup::{self, Dedup};
use crate::envelope::{self, Produce, Record};
use crate::failure::FailureKind;
use crate::handler::{CallOutcome, HandlerInstance, LoadedHandler};
use crate::metrics::{HandlerMetrics, Health, Metrics};
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
    producer: FutureProducer,
    by_topic: HashMap<String, Vec<Arc<LoadedHandler>>>,
    retry_topics: std::collections::HashSet<String>,
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

    fn produce_error(&self) {
        if let Some(m) = &self.obs.metrics {
            m.produce_errors.inc();
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

/// The consumer context: flushes revoked partitions before they move,
/// reports joining the group and consumer lag.
struct WeirContext {
    workers: Arc<Workers>,
    drain_timeout: Duration,
    obs: Observability,
}

impl ClientContext for WeirContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(m) = &self.obs.metrics {
            m.record_lag(&statistics);
        }
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
        if let Rebalance::Assign(tpl) = rebalance {
            info!(partitions = tpl.count(), "partitions assigned");
            self.obs.health.joined.store(true, Ordering::Relaxed);
            // A partition paused before it was revoked stays paused in
            // librdkafka when it comes back; it has no worker yet, so
            // nothing else would resume it.
            if let Err(e) = base.resume(tpl) {
                warn!(error = %e, "cannot resume assigned partitions");
            }
        }
    }
}

/// Waits for workers' finalizers until `deadline`, then cancels the rest.
fn drain(workers: &mut [Worker], deadline: Instant) {
    let wait = |w: &mut Worker| {
        let mut done = w.done.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = async move {
            let _ = tokio::time::timeout(left, done.wait_for(|d| *d)).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => tokio::task::block_in_place(|| h.block_on(fut)),
            Err(_) => futures::executor::block_on(fut),
        }
    };
    for w in workers.iter_mut() {
        wait(w);
        if !*w.done.borrow() {
            warn!("in-flight events did not finish in time; they will be redelivered");
            w.cancel.store(true, Ordering::SeqCst);
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
}

fn commit_sync<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => debug!("offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "offset commit failed"),
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
    let producer: FutureProducer = producer_config(&config)
        .create()
        .context("cannot create the Kafka producer")?;
    let workers = Arc::new(Workers::default());
    let context = WeirContext {
        workers: workers.clone(),
        drain_timeout: config.pipeline.drain_timeout(),
        obs: obs.clone(),
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
        producer,
        by_topic,
        retry_topics: handlers
            .iter()
            .flat_map(|h| h.config_entry.retry_topics())
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
                match consumer.commit_consumer_state(CommitMode::Async) {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => warn!(error = %e, "offset commit failed"),
                }
            }
        })
    };

    tokio::pin!(shutdown);
    let mut resume_tick = tokio::time::interval(Duration::from_millis(20));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = consumer.recv() => match msg {
                Ok(msg) => dispatch(&shared, &consumer, &workers, to_record(&msg)),
                Err(e) => warn!(error = %e, "consumer error"),
            },
            _ = resume_tick.tick() => unpark(&consumer, &workers, &shared),
            _ = stats_tick.tick() => shared.stats.log_progress(),
        }
    }

    info!("shutting down: finishing in-flight events");
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
    let deadline = Instant::now() + shared.config.pipeline.drain_timeout();
    drain(&mut all, deadline);
    commit_sync(consumer.as_ref());
    shared.stats.log_progress();
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

fn to_record(msg: &impl Message) -> Record {
    Record {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
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
            Err(mpsc::error::TrySendError::Closed(_)) => worker_died(&tp),
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

/// A worker thread that ended while its partition is assigned is a bug;
/// carrying on would commit past the events it dropped. Exiting keeps the
/// promise: everything after the last commit is redelivered.
fn worker_died(tp: &TopicPartition) -> ! {
    error!(topic = %tp.0, partition = tp.1,
        "a partition worker stopped unexpectedly; exiting so that its events are redelivered");
    std::process::exit(70)
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
    let was_over = workers.over_total.load(Ordering::Relaxed);
    // Hysteresis: over at the bound, under again at half of it.
    let over = if was_over {
        queued * 2 >= max_total
    } else {
        queued >= max_total
    };
    workers.over_total.store(over, Ordering::Relaxed);
    if over {
        return;
    }
    for (tp, w) in map.iter_mut() {
        let Some(tx) = &w.tx else { continue };
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
                Err(mpsc::error::TrySendError::Closed(_)) => worker_died(tp),
            }
        }
        // Resume once half the queue is free, so a partition does not flap.
        if w.paused && w.parked.is_empty() && tx.capacity() * 2 >= tx.max_capacity() {
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
    future: DeliveryFuture,
    /// The producer span, ended at the acknowledgement.
    span: Option<TraceContext>,
    /// Counted once acknowledged (outputs or dead letters of a handler).
    counter: Option<IntCounter>,
}

fn spawn_worker(
    shared: Arc<Shared>,
    consumer: &Arc<StreamConsumer<WeirContext>>,
    tp: &TopicPartition,
    first_offset: i64,
) -> Worker {
    let capacity = shared.config.pipeline.max_in_flight_per_partition;
    let (tx, rx) = mpsc::channel::<Record>(capacity);
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(capacity);
    let (done_tx, done_rx) = watch::channel(false);
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handlers = shared.by_topic.get(&tp.0).cloned().unwrap_or_default();
    let in_flight = Arc::new(AtomicI64::new(0));
    debug!(topic = %tp.0, partition = tp.1, first_offset, "starting partition worker");

    tokio::spawn(finalize(
        tp.clone(),
        pending_rx,
        consumer.clone(),
        shared.clone(),
        in_flight.clone(),
        cancel.clone(),
        done_tx,
    ));
    let thread = {
        let cancel = cancel.clone();
        let stop = stop.clone();
        let tp = tp.clone();
        std::thread::Builder::new()
            .name(format!("weir-{}-{}", tp.0, tp.1))
            .spawn(move || {
                PartitionWorker::new(shared, handlers, cancel).run(rx, pending_tx, &stop);
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
        done: done_rx,
        thread: Some(thread),
        in_flight,
    }
}

/// Awaits each event's acknowledgements in offset order, marks the
/// events in the idempotency store, then stores the offset after them.
/// Events that are ready together are marked in one batch. A record the
/// broker refused is sent again, so nothing is committed past an output or
/// dead letter that is not durable.
async fn finalize(
    tp: TopicPartition,
    mut pending: mpsc::Receiver<Pending>,
    consumer: Arc<StreamConsumer<WeirContext>>,
    shared: Arc<Shared>,
    in_flight: Arc<AtomicI64>,
    cancel: Arc<AtomicBool>,
    done: watch::Sender<bool>,
) {
    let (stats, dedup) = (&shared.stats, &shared.dedup);
    const BATCH: usize = 512;
    let mut batch = Vec::with_capacity(BATCH);
    'events: while let Some(first) = pending.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match pending.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        for p in batch.iter_mut() {
            for delivery in p.deliveries.drain(..) {
                if !acknowledged(delivery.future, &shared, &cancel, delivery.span.as_ref()).await {
                    break 'events;
                }
                stats.outputs.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = delivery.counter {
                    c.inc();
                }
                if let Some(span) = delivery.span {
                    telemetry::end(&span);
                }
            }
        }
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        if let Some(dedup) = &dedup {
            let keys = batch.iter().flat_map(|p| p.marks.iter().map(Vec::as_slice));
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = dedup.mark(keys.clone()) {
                // Committing without the marks would let duplicates through
                // after a crash: wait for the store instead.
                error!(error = %format!("{e:#}"), "cannot mark events as processed; retrying");
                if cancel.load(Ordering::SeqCst) {
                    break 'events;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        let last = batch.last().expect("a non-empty batch").offset;
        if let Err(e) = consumer.store_offset(&tp.0, tp.1, last) {
            // Only fails when the partition is no longer ours; the new owner
            // starts from the last commit.
            debug!(topic = %tp.0, partition = tp.1, error = %e, "offset not stored");
        }
        stats
            .events_final
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        in_flight.fetch_sub(batch.len() as i64, Ordering::Relaxed);
        batch.clear();
    }
    let _ = done.send(true);
}

/// Waits for one record's acknowledgement, re-sending it while the broker
/// refuses it. False when cancelled before it was acknowledged.
async fn acknowledged(
    mut delivery: DeliveryFuture,
    shared: &Shared,
    cancel: &AtomicBool,
    span: Option<&TraceContext>,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = loop {
            tokio::select! {
                r = &mut delivery => break r,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if cancel.load(Ordering::SeqCst) {
                        gave_up(span);
                        return false;
                    }
                }
            }
        };
        let (err, msg) = match outcome {
            Ok(Ok(_)) => return true,
            Ok(Err((err, msg))) => (err, msg),
            Err(_) => {
                // The producer is gone: shutting down.
                gave_up(span);
                return false;
            }
        };
        error!(topic = msg.topic(), error = %err,
            "a record could not be published; the partition waits and retries (nothing is committed past it)");
        shared.produce_error();
        if let Some(span) = span {
            telemetry::event(span, || {
                (
                    "produce error",
                    vec![KeyValue::new("error", err.to_string())],
                )
            });
        }
        if cancel.load(Ordering::SeqCst) {
            gave_up(span);
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        let again = to_record(&msg);
        let produce = Produce {
            topic: again.topic,
            key: again.key,
            value: again.value,
            headers: again.headers,
        };
        match send_async(shared, &produce, cancel).await {
            Some(d) => delivery = d,
            None => {
                gave_up(span);
                return false;
            }
        }
    }
}

/// Marks a producer span whose record was given up on (it is redelivered
/// with its event).
fn gave_up(span: Option<&TraceContext>) {
    if let Some(span) = span {
        telemetry::fail(span, "not-acknowledged", "given up at shutdown or revoke");
    }
}

/// Enqueues a record, waiting while the producer's queue is full. None
/// when cancelled. For worker threads.
fn send(shared: &Shared, p: &Produce, cancel: &AtomicBool) -> Option<DeliveryFuture> {
    loop {
        match enqueue(shared, p) {
            Ok(d) => return Some(d),
            Err(wait) => {
                if cancel.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(wait);
            }
        }
    }
}

/// [`send`] for async tasks.
async fn send_async(shared: &Shared, p: &Produce, cancel: &AtomicBool) -> Option<DeliveryFuture> {
    loop {
        match enqueue(shared, p) {
            Ok(d) => return Some(d),
            Err(wait) => {
                if cancel.load(Ordering::SeqCst) {
                    return None;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One attempt to enqueue a record; on failure, how long to wait before
/// the next.
fn enqueue(shared: &Shared, p: &Produce) -> Result<DeliveryFuture, Duration> {
    let mut headers = OwnedHeaders::new_with_capacity(p.headers.len());
    for (k, v) in &p.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record = FutureRecord::to(&p.topic)
        .payload(&p.value)
        .headers(headers);
    if let Some(k) = &p.key {
        record = record.key(k);
    }
    match shared.producer.send_result(record) {
        Ok(d) => Ok(d),
        // The producer's queue drains as the broker acknowledges.
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
            Err(Duration::from_millis(5))
        }
        Err((e, _)) => {
            error!(topic = %p.topic, error = %e, "cannot enqueue a record; retrying");
            shared.produce_error();
            Err(Duration::from_millis(100))
        }
    }
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

/// The header `weir dlq replay` adds: a replayed record is a new delivery
/// of its event, so it gets its own idempotency key.
pub const REPLAY_HEADER: &str = "weir-replay-of";

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
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Record>,
        pending: mpsc::Sender<Pending>,
        stop: &AtomicBool,
    ) {
        while let Some(record) = rx.blocking_recv() {
            if stop.load(Ordering::SeqCst) || self.cancel.load(Ordering::SeqCst) {
                break;
            }
            let Some(p) = self.process(&record) else {
                break;
            };
            if pending.blocking_send(p).is_err() {
                break;
            }
        }
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

    fn dedup_id(event_id: &str, record: &Record) -> String {
        match record.header(REPLAY_HEADER) {
            Some(of) => format!("{event_id}@replay:{}", String::from_utf8_lossy(of)),
            None => event_id.to_owned(),
        }
    }

    fn process(&mut self, consumed: &Record) -> Option<Pending> {
        let retry = take_retry(consumed);
        let (record, retry) = match &retry {
            Some((original, info)) => (original, Some(info)),
            None => (consumed, None),
        };
        // The context the event arrived with (for a retry record: the
        // context of the span that sent it to the retry topic).
        let parent = self.shared.tracing().extract(&record.headers);
        if retry.is_none() && self.shared.retry_topics.contains(&consumed.topic) {
            let d = self.dead_letter_unrouted(
                consumed,
                &parent,
                "a record in a retry topic without valid retry headers",
            )?;
            return Some(Pending {
                offset: consumed.offset,
                deliveries: vec![d],
                marks: Vec::new(),
            });
        }
        if let Some(info) = retry {
            let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
            let wait = info.not_before_ms.saturating_sub(now).max(0) as u64;
            // Never longer than the longest backoff of the handler it names.
            let cap = self
                .handlers
                .iter()
                .find(|(h, _, _)| h.name == info.handler)
                .map_or(0, |(h, _, _)| h.config_entry.max_backoff_ms);
            if wait > 0 && !self.sleep(Duration::from_millis(wait.min(cap))) {
                return None;
            }
        }
        let mut deliveries = Vec::new();
        let mut marks = Vec::new();
        let shared = self.shared.clone();
        let group = shared.config.kafka.group_id.as_str();
        let dedup_on = shared.dedup.is_some();
        let done = |deliveries, marks| {
            Some(Pending {
                offset: consumed.offset,
                deliveries,
                marks,
            })
        };
        let event = match envelope::decode(record) {
            Ok(event) => event,
            Err(undecodable) => {
                let id = Self::dedup_id(&record.position_id(), record);
                let keys: Vec<Vec<u8>> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| dedup::key(&h.name, &id))
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
        let id = Self::dedup_id(&event.id, record);
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
            let started = Instant::now();
            self.throttled = Duration::ZERO;
            let verdict = self.call(i, &event, record, retry, &cx)?;
            // Waiting for the fuel budget is throttling, not handling.
            let took = started.elapsed().saturating_sub(self.throttled);
            if dedup_on && !matches!(verdict, Verdict::Retry { .. }) {
                self.recent.insert(&key);
                marks.push(key);
            }
            match verdict {
                Verdict::Outputs(outputs) => {
                    debug!(trace_id = %telemetry::trace_id(&cx), handler = %handler.name, event_id = %event.id,
                        correlation_id = %event.correlation_id, causation_id = event.causation_id.as_deref().unwrap_or(""),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        outputs = outputs.len(), "handled");
                    for mut o in outputs {
                        let span = self.publish_span(&cx, &mut o, &event.correlation_id, None);
                        deliveries.push(Delivery {
                            future: send(&self.shared, &o, &self.cancel)?,
                            span,
                            counter: metrics.output_counter(),
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
                    let mut p = retry_record(
                        record,
                        &event.correlation_id,
                        &handler.name,
                        attempt,
                        delay,
                        first_failure,
                        topic,
                    );
                    let span = self.publish_span(&cx, &mut p, &event.correlation_id, None);
                    deliveries.push(Delivery {
                        future: send(&self.shared, &p, &self.cancel)?,
                        span,
                        counter: None,
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
            deliveries.push(self.dead_letter_unrouted(consumed, &parent, &message)?);
        }
        if let Some(cx) = receive {
            telemetry::end(&cx);
        }
        done(deliveries, marks)
    }

    /// Starts the producer span of a record sent on behalf of the span in
    /// `cx` and writes its context into the record's headers, so whoever
    /// consumes the record continues the trace.
    fn publish_span(
        &self,
        cx: &TraceContext,
        p: &mut Produce,
        correlation_id: &str,
        dead_letter_reason: Option<&str>,
    ) -> Option<TraceContext> {
        let tracing = self.shared.tracing();
        let span = tracing.start(cx, || {
            telemetry::producer_span(p, correlation_id, dead_letter_reason)
        });
        tracing.inject(&span, &mut p.headers);
        tracing.enabled().then_some(span)
    }

    /// Dead-letters a record no handler can take.
    fn dead_letter_unrouted(
        &mut self,
        record: &Record,
        parent: &TraceContext,
        message: &str,
    ) -> Option<Delivery> {
        let topic = deadletter::default_topic(&record.topic);
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
        let mut produce = dl.into_produce(topic);
        let span = self.publish_span(cx, &mut produce, correlation_id, Some(kind.name()));
        self.shared
            .stats
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        Some(Delivery {
            future: send(&self.shared, &produce, &self.cancel)?,
            span,
            counter,
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

/// Headers of a record in a retry topic.
mod retry_header {
    pub const HANDLER: &str = "weir-retry-handler";
    pub const ATTEMPT: &str = "weir-retry-attempt";
    pub const NOT_BEFORE: &str = "weir-retry-not-before";
}

/// Where a record read from a retry topic stands.
struct RetryInfo {
    handler: String,
    attempt: u32,
    not_before_ms: i64,
    first_failure: OffsetDateTime,
}

/// The record a retry-topic record stands for (original position, original
/// headers), and its retry state; None for an ordinary record.
fn take_retry(record: &Record) -> Option<(Record, RetryInfo)> {
    let text = |name: &str| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let handler = text(retry_header::HANDLER)?;
    let info = RetryInfo {
        handler,
        attempt: text(retry_header::ATTEMPT)?.parse().ok()?,
        not_before_ms: text(retry_header::NOT_BEFORE)?.parse().ok()?,
        first_failure: text(deadletter::header::FIRST_FAILURE_AT)
            .and_then(|t| {
                OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
            })
            .unwrap_or_else(OffsetDateTime::now_utc),
    };
    let original = Record {
        topic: text(deadletter::header::ORIGINAL_TOPIC)?,
        partition: text(deadletter::header::ORIGINAL_PARTITION)?.parse().ok()?,
        offset: text(deadletter::header::ORIGINAL_OFFSET)?.parse().ok()?,
        timestamp_ms: text(deadletter::header::ORIGINAL_TIMESTAMP)?.parse().ok()?,
        key: record.key.clone(),
        value: record.value.clone(),
        headers: record
            .headers
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("weir-retry-")
                    && !k.starts_with("weir-original-")
                    && k != deadletter::header::FIRST_FAILURE_AT
            })
            .cloned()
            .collect(),
    };
    Some((original, info))
}

/// The record to send to a retry topic for `attempt` after `delay`. An
/// event without a correlation id got a fresh one (`correlation_id`); it is
/// kept as a header so that every attempt shares it.
#[allow(clippy::too_many_arguments)]
fn retry_record(
    record: &Record,
    correlation_id: &str,
    handler: &str,
    attempt: u32,
    delay: Duration,
    first_failure: OffsetDateTime,
    topic: String,
) -> Produce {
    let not_before = OffsetDateTime::now_utc().unix_timestamp() * 1000 + delay.as_millis() as i64;
    let mut headers = record.headers.clone();
    deadletter::add_origin(&mut headers, record);
    let mut add = |k: &str, v: String| headers.push((k.to_owned(), v.into_bytes()));
    if record.header(envelope::header::CORRELATION_ID).is_none() {
        add(envelope::header::CORRELATION_ID, correlation_id.to_owned());
    }
    add(retry_header::HANDLER, handler.to_owned());
    add(retry_header::ATTEMPT, attempt.to_string());
    add(retry_header::NOT_BEFORE, not_before.to_string());
    add(
        deadletter::header::FIRST_FAILURE_AT,
        first_failure
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    );
    Produce {
        topic,
        key: record.key.clone(),
        value: record.value.clone(),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            topic: "orders".into(),
            partition: 2,
            offset: 40,
            timestamp_ms: 7,
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("correlation-id".into(), b"c-1".to_vec()),
            ],
        }
    }

    #[test]
    fn a_retry_record_keeps_a_generated_correlation_id() {
        let mut r = record();
        r.headers.retain(|(k, _)| k != "correlation-id");
        let p = retry_record(
            &r,
            "fresh",
            "h",
            2,
            Duration::ZERO,
            OffsetDateTime::now_utc(),
            "orders.retry".into(),
        );
        let kept = p.headers.iter().find(|(k, _)| k == "correlation-id");
        assert_eq!(kept.map(|(_, v)| v.as_slice()), Some(&b"fresh"[..]));
    }

    #[test]
    fn a_retry_record_stands_for_its_original() {
        let first = OffsetDateTime::now_utc();
        let p = retry_record(
            &record(),
            "c-1",
            "h",
            3,
            Duration::from_millis(500),
            first,
            "orders.retry".into(),
        );
        assert_eq!(p.topic, "orders.retry");
        let consumed = Record {
            topic: p.topic,
            partition: 0,
            offset: 9,
            timestamp_ms: 8,
            key: p.key,
            value: p.value,
            headers: p.headers,
        };
        let (original, info) = take_retry(&consumed).expect("a retry record");
        assert_eq!(original.topic, "orders");
        assert_eq!(
            (original.partition, original.offset, original.timestamp_ms),
            (2, 40, 7)
        );
        assert_eq!(
            original.headers,
            record().headers,
            "retry headers are stripped"
        );
        assert_eq!((info.handler.as_str(), info.attempt), ("h", 3));
        assert!(info.not_before_ms >= first.unix_timestamp() * 1000 + 500);
    }

    #[test]
    fn an_ordinary_record_is_not_a_retry() {
        assert!(take_retry(&record()).is_none());
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
