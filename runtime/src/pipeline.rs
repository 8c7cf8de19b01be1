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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::deadletter::{self, DeadLetter};
use crate::envelope::{self, Produce, Record};
use crate::failure::FailureKind;
use crate::handler::{CallOutcome, HandlerInstance, LoadedHandler};

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
    /// Handler call durations in microseconds (for benchmarks).
    pub handle_micros: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Partitions paused for backpressure, since start.
    pub pauses: AtomicU64,
}

impl Stats {
    fn record_handle(&self, d: Duration) {
        if let Some(h) = self.handle_micros.lock().unwrap().as_mut() {
            let _ = h.record(d.as_micros() as u64);
        }
    }
}

/// Everything a worker and a finalizer need, shared.
struct Shared {
    config: Config,
    producer: FutureProducer,
    by_topic: HashMap<String, Vec<Arc<LoadedHandler>>>,
    stats: Arc<Stats>,
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
}

impl Worker {
    /// Stops taking records; the event being handled is finished and its
    /// outcome made final, the queued ones are dropped (not committed).
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        self.parked.clear();
    }
}

#[derive(Default)]
struct Workers {
    map: Mutex<HashMap<TopicPartition, Worker>>,
}

/// The consumer context: flushes revoked partitions before they move.
struct WeirContext {
    workers: Arc<Workers>,
    drain_timeout: Duration,
}

impl ClientContext for WeirContext {}

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
                    w.close();
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

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            info!(partitions = tpl.count(), "partitions assigned");
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
        if let Some(t) = w.thread.take() {
            let _ = t.join();
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

/// The producer every output and dead letter goes through: idempotent,
/// acks from all replicas, Java-compatible key partitioning.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in config
        .kafka
        .options
        .iter()
        .chain(&config.kafka.producer_options)
    {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5");
    c
}

fn consumer_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in config
        .kafka
        .options
        .iter()
        .chain(&config.kafka.consumer_options)
    {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.kafka.auto_offset_reset)
        .set("enable.partition.eof", "false");
    c
}

/// Runs the pipeline until `shutdown` resolves, then drains and commits.
pub async fn run(
    config: Config,
    handlers: Vec<Arc<LoadedHandler>>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut by_topic: HashMap<String, Vec<Arc<LoadedHandler>>> = HashMap::new();
    for h in &handlers {
        for t in &h.topics {
            by_topic.entry(t.clone()).or_default().push(h.clone());
        }
    }
    let producer: FutureProducer = producer_config(&config)
        .create()
        .context("cannot create the Kafka producer")?;
    let workers = Arc::new(Workers::default());
    let context = WeirContext {
        workers: workers.clone(),
        drain_timeout: config.pipeline.drain_timeout(),
    };
    let consumer: Arc<StreamConsumer<WeirContext>> = Arc::new(
        consumer_config(&config)
            .create_with_context(context)
            .context("cannot create the Kafka consumer")?,
    );
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
        stats,
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
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = consumer.recv() => match msg {
                Ok(msg) => dispatch(&shared, &consumer, &workers, to_record(&msg)),
                Err(e) => warn!(error = %e, "consumer error"),
            },
            _ = resume_tick.tick() => unpark(&consumer, &workers),
        }
    }

    info!("shutting down: finishing in-flight events");
    commit_task.abort();
    let mut all: Vec<Worker> = {
        let mut map = workers.map.lock().unwrap();
        map.drain()
            .map(|(_, mut w)| {
                w.close();
                w
            })
            .collect()
    };
    let deadline = Instant::now() + shared.config.pipeline.drain_timeout();
    drain(&mut all, deadline);
    commit_sync(consumer.as_ref());
    info!("offsets committed; stopped");
    Ok(())
}

fn to_record(msg: &BorrowedMessage<'_>) -> Record {
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
    w.next_offset = record.offset + 1;
    if !w.parked.is_empty() {
        w.parked.push_back(record);
        return;
    }
    let Some(tx) = &w.tx else { return };
    match tx.try_send(record) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(record)) => {
            w.parked.push_back(record);
            if !w.paused {
                match consumer.pause(&tpl_of(&tp)) {
                    Ok(()) => {
                        w.paused = true;
                        shared.stats.pauses.fetch_add(1, Ordering::Relaxed);
                        debug!(topic = %tp.0, partition = tp.1, "partition paused: worker queue full");
                    }
                    Err(e) => warn!(error = %e, "cannot pause partition"),
                }
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Moves parked records into workers with room, resuming drained partitions.
fn unpark(consumer: &StreamConsumer<WeirContext>, workers: &Workers) {
    let mut map = workers.map.lock().unwrap();
    for (tp, w) in map.iter_mut() {
        let Some(tx) = &w.tx else { continue };
        while let Some(record) = w.parked.pop_front() {
            match tx.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(record)) => {
                    w.parked.push_front(record);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        if w.paused && w.parked.is_empty() {
            match consumer.resume(&tpl_of(tp)) {
                Ok(()) => {
                    w.paused = false;
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
    deliveries: Vec<DeliveryFuture>,
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
    debug!(topic = %tp.0, partition = tp.1, first_offset, "starting partition worker");

    tokio::spawn(finalize(
        tp.clone(),
        pending_rx,
        consumer.clone(),
        shared.producer.clone(),
        shared.stats.clone(),
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
    }
}

/// Awaits each event's acknowledgements in offset order, then stores the
/// offset after it. A record the broker refused is sent again, so nothing
/// is committed past an output or dead letter that is not durable.
async fn finalize(
    tp: TopicPartition,
    mut pending: mpsc::Receiver<Pending>,
    consumer: Arc<StreamConsumer<WeirContext>>,
    producer: FutureProducer,
    stats: Arc<Stats>,
    cancel: Arc<AtomicBool>,
    done: watch::Sender<bool>,
) {
    'events: while let Some(p) = pending.recv().await {
        for delivery in p.deliveries {
            if !acknowledged(delivery, &producer, &cancel).await {
                break 'events;
            }
            stats.outputs.fetch_add(1, Ordering::Relaxed);
        }
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        if let Err(e) = consumer.store_offset(&tp.0, tp.1, p.offset) {
            // Only fails when the partition is no longer ours; the new owner
            // starts from the last commit.
            debug!(topic = %tp.0, partition = tp.1, error = %e, "offset not stored");
        }
        stats.events_final.fetch_add(1, Ordering::Relaxed);
    }
    let _ = done.send(true);
}

/// Waits for one record's acknowledgement, re-sending it while the broker
/// refuses it. False when cancelled before it was acknowledged.
async fn acknowledged(
    mut delivery: DeliveryFuture,
    producer: &FutureProducer,
    cancel: &AtomicBool,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (err, msg) = match delivery.await {
            Ok(Ok(_)) => return true,
            Ok(Err((err, msg))) => (err, msg),
            Err(_) => return false, // the producer is gone: shutting down
        };
        error!(topic = msg.topic(), error = %err,
            "a record could not be published; the partition waits and retries (nothing is committed past it)");
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        let produce = Produce {
            topic: msg.topic().to_owned(),
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
        };
        match send(producer, &produce, cancel) {
            Some(d) => delivery = d,
            None => return false,
        }
    }
}

/// Enqueues a record, waiting while the producer's queue is full. None
/// when cancelled.
fn send(producer: &FutureProducer, p: &Produce, cancel: &AtomicBool) -> Option<DeliveryFuture> {
    let mut headers = OwnedHeaders::new_with_capacity(p.headers.len());
    for (k, v) in &p.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    loop {
        let mut record = FutureRecord::to(&p.topic)
            .payload(&p.value)
            .headers(headers.clone());
        if let Some(k) = &p.key {
            record = record.key(k);
        }
        match producer.send_result(record) {
            Ok(d) => return Some(d),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if cancel.load(Ordering::SeqCst) {
                    return None;
                }
                // The producer's queue drains as the broker acknowledges.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => {
                error!(topic = %p.topic, error = %e, "cannot enqueue a record; retrying");
                if cancel.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Handles one partition's events, in order, on its own thread.
struct PartitionWorker {
    shared: Arc<Shared>,
    handlers: Vec<(Arc<LoadedHandler>, Option<HandlerInstance>)>,
    cancel: Arc<AtomicBool>,
}

/// What became of one handler's call for one event.
enum Verdict {
    Outputs(Vec<Produce>),
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
            shared,
            handlers: handlers.into_iter().map(|h| (h, None)).collect(),
            cancel,
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
    fn process(&mut self, record: &Record) -> Option<Pending> {
        let mut deliveries = Vec::new();
        let group = self.shared.config.kafka.group_id.clone();
        match envelope::decode(record) {
            Err(undecodable) => {
                let names: Vec<&str> = self.handlers.iter().map(|(h, _)| h.name.as_str()).collect();
                let versions: Vec<&str> = self
                    .handlers
                    .iter()
                    .map(|(h, _)| h.version.as_str())
                    .collect();
                let topic = self
                    .handlers
                    .first()
                    .and_then(|(h, _)| h.dead_letter_topic.clone())
                    .unwrap_or_else(|| deadletter::default_topic(&record.topic));
                warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
                    reason = %undecodable, dead_letter_topic = %topic, "undecodable event dead-lettered");
                let now = OffsetDateTime::now_utc();
                let dl = DeadLetter {
                    record,
                    kind: FailureKind::Undecodable,
                    message: undecodable.0,
                    handler: names.join(","),
                    handler_version: versions.join(","),
                    attempts: 1,
                    group_id: &group,
                    first_failure: now,
                    last_failure: now,
                }
                .into_produce(topic);
                deliveries.push(send(&self.shared.producer, &dl, &self.cancel)?);
                self.shared
                    .stats
                    .dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(event) => {
                for i in 0..self.handlers.len() {
                    if !self.handlers[i].0.accepts(&event.event_type) {
                        continue;
                    }
                    let handler = self.handlers[i].0.clone();
                    match self.call(i, &event, record)? {
                        Verdict::Outputs(outputs) => {
                            debug!(handler = %handler.name, event_id = %event.id, outputs = outputs.len(), "handled");
                            for o in &outputs {
                                deliveries.push(send(&self.shared.producer, o, &self.cancel)?);
                            }
                            self.shared.stats.handled.fetch_add(1, Ordering::Relaxed);
                        }
                        Verdict::Failed {
                            kind,
                            message,
                            attempts,
                            first_failure,
                        } => {
                            let topic = handler
                                .dead_letter_topic
                                .clone()
                                .unwrap_or_else(|| deadletter::default_topic(&record.topic));
                            warn!(handler = %handler.name, event_id = %event.id, topic = %record.topic,
                                partition = record.partition, offset = record.offset, kind = %kind,
                                reason = %message, attempts, dead_letter_topic = %topic, "event dead-lettered");
                            let dl = DeadLetter {
                                record,
                                kind,
                                message,
                                handler: handler.name.clone(),
                                handler_version: handler.version.clone(),
                                attempts,
                                group_id: &group,
                                first_failure,
                                last_failure: OffsetDateTime::now_utc(),
                            }
                            .into_produce(topic);
                            deliveries.push(send(&self.shared.producer, &dl, &self.cancel)?);
                            self.shared
                                .stats
                                .dead_lettered
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        Some(Pending {
            offset: record.offset,
            deliveries,
        })
    }

    /// Calls handler `i`, retrying `retriable` failures with exponential
    /// backoff and full jitter, in place (the partition waits, in order).
    fn call(&mut self, i: usize, event: &envelope::Event, record: &Record) -> Option<Verdict> {
        let handler = self.handlers[i].0.clone();
        let mut first_failure = None;
        let mut attempt = 1;
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
            let started = Instant::now();
            let outcome = instance.call(event, record, attempt);
            self.shared.stats.record_handle(started.elapsed());
            if instance.is_poisoned() {
                self.handlers[i].1 = None;
            }
            let failed_at = *first_failure.get_or_insert_with(OffsetDateTime::now_utc);
            match outcome {
                CallOutcome::Ok(outputs) => {
                    let mut produced = Vec::with_capacity(outputs.len());
                    for o in outputs {
                        match envelope::encode_output(o, event) {
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
                    if attempt >= handler.max_attempts {
                        return Some(Verdict::Failed {
                            kind: FailureKind::RetriesExhausted,
                            message,
                            attempts: attempt,
                            first_failure: failed_at,
                        });
                    }
                    let delay = handler.backoff(attempt);
                    debug!(handler = %handler.name, event_id = %event.id, attempt, ?delay, reason = %message, "retrying");
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
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
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.cancel.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        true
    }
}
