//! The consumer pipeline: Kafka partitions → per-partition ordered workers →
//! handler calls → outputs or dead letters → ordered finalizer → offsets.
//!
//! Each assigned partition gets a worker thread that handles its events one
//! at a time, in offset order, and an ordered finalizer task that awaits the
//! acknowledgements of what each event produced and only then stores the
//! event's offset. Stored offsets are committed periodically, on revoke and
//! on shutdown, so a commit never passes an event whose outcome is not final.
//!
//! The path of one event, by module: `source` (a partition's worker and
//! finalizer started, records handed over, pause and resume; `group`:
//! assignment and revocation) → `worker` (the partition's thread; retry
//! records wait there until due) → `dispatch` (retry state, envelope,
//! routing, idempotency check; `dispatch::send`: what the outcome sends) →
//! `invoke` (the call under its limits, in-place retries) →
//! [`crate::publish`] (or, exactly-once, `outbox`: the records of the
//! events in hand sent inside the transaction gate, still on the worker's
//! thread) → `finalizer` (acknowledgements, marks, stored offsets;
//! `finalizer::settle`: one delivery and what a refusal needs) → `commit`
//! (or, exactly-once, `transaction` and `transaction::commit`; `suspects`:
//! events whose records were refused). Below the stages: `shared` (the
//! config, clients and stores every stage reads), `consumer` (the group's
//! consumer as the stages use it: pause, resume, store an offset),
//! `offsets` (the lattice of final offsets), `observe` (what happened to an
//! event, each a `Happened` whose `emit` logs it with the event's fields,
//! marks its span and counts it), `stats` (what the pipeline reports).
//! Imports follow the path without a cycle: a stage imports those after
//! it (what it hands on) and the modules below, never one before it
//! (`dispatch`, `invoke` and `outbox` add methods to the worker; `shared`
//! holds the exactly-once `transaction` handle). This file wires them:
//! [`run`].

mod commit;
mod consumer;
mod dispatch;
mod finalizer;
mod group;
mod invoke;
mod observe;
mod offsets;
mod outbox;
mod shared;
mod source;
mod stats;
mod suspects;
mod transaction;
mod worker;

pub use stats::{Observability, Stats};
pub use suspects::Suspects;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::changelog::Changelog;
use crate::config::Config;
use crate::dedup::Dedup;
use crate::deploy::Slot;
use crate::envelope::Record;
use crate::fence::Fence;
use crate::halt::Halt;
use crate::handler::LoadedHandler;
use crate::kafka::{consumer_config, ensure_topics};
use crate::publish::Publisher;
use crate::state::StateStore;
use commit::commit_sync;
use consumer::GroupConsumer;
use group::{drain, WeirContext};
use shared::Shared;
use source::{hand_over, taking, unpark, Worker, Workers};
use transaction::Transactions;

/// The pipeline stopped with the events in hand of this many partitions
/// unfinished after the drain timeout (they will be redelivered).
#[derive(Debug)]
pub struct Unfinished(pub usize);

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped with the events in hand of {} partition(s) unfinished after \
             pipeline.drain_timeout_ms; they will be redelivered",
            self.0
        )
    }
}

impl std::error::Error for Unfinished {}

/// Exactly-once: a transaction aborted, for this reason; the pipeline is
/// rebuilt and its partitions start again from their committed offsets.
#[derive(Debug)]
pub struct Rewound(pub String);

impl std::fmt::Display for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a transaction aborted ({}); rewinding", self.0)
    }
}

impl std::error::Error for Rewound {}

/// Records handed to the workers at most in one pass of the poll loop.
const BURST: usize = 256;

/// Runs the pipeline until `shutdown` resolves, then drains and commits.
pub async fn run(
    config: Config,
    slots: Vec<Arc<Slot>>,
    dedup: Option<Arc<Dedup>>,
    stats: Arc<Stats>,
    obs: Observability,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    // Subscriptions are the serving versions' (a reload that changes them
    // rebuilds the pipeline).
    let handlers: Vec<Arc<LoadedHandler>> = slots.iter().map(|s| s.current().1).collect();
    let mut by_topic: HashMap<String, Vec<Arc<Slot>>> = HashMap::new();
    for (h, slot) in handlers.iter().zip(&slots) {
        for t in h
            .topics()
            .iter()
            .cloned()
            .chain(h.config_entry.retry_topics())
        {
            let subscribed = by_topic.entry(t).or_default();
            if !subscribed.iter().any(|s| Arc::ptr_eq(s, slot)) {
                subscribed.push(slot.clone());
            }
        }
    }
    // A pipeline rebuilt after a reload starts as the first one did.
    obs.health.stopping.store(false, Ordering::Relaxed);
    obs.health.joined.store(false, Ordering::Relaxed);
    let (halt, mut halted) = Halt::new(obs.health.clone());
    let publisher = Publisher::new(&config, halt.clone(), obs.metrics.clone())?;
    tokio::pin!(shutdown);
    let txn = if config.delivery.exactly_once() {
        let txn = Arc::new(Transactions::new(
            publisher.clone(),
            config.delivery.transactional_id()?,
            Duration::from_millis(config.delivery.transaction_timeout_ms),
            config.pipeline.commit_interval(),
            dedup.clone(),
            obs.metrics.clone(),
            obs.health.clone(),
            stats.clone(),
        ));
        // A broker away at start is waited for (not ready meanwhile).
        let mut backoff = Duration::from_millis(500);
        loop {
            let t = txn.clone();
            let init = tokio::task::spawn_blocking(move || t.init());
            let started = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = halted.changed() => {
                    anyhow::bail!("stopped: {}", halt.reason().unwrap_or_default());
                }
                r = init => r.context("the transactional producer's start-up failed")?,
            };
            let Err(e) = started else { break };
            let e = format!("{e:#}");
            error!(error = %e, "cannot start exactly-once delivery; retrying");
            obs.health.set_problem("transaction", e);
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        Some(txn)
    } else {
        None
    };
    let workers = Arc::new(Workers::default());
    let context = WeirContext {
        workers: workers.clone(),
        drain_timeout: config.pipeline.drain_timeout(),
        obs: obs.clone(),
        commits: Default::default(),
        txn: txn.clone(),
    };
    let consumer: Arc<StreamConsumer<WeirContext>> = Arc::new(
        consumer_config(&config)
            .create_with_context(context)
            .context("cannot create the Kafka consumer")?,
    );
    // The stages below the poll loop see the consumer through this.
    let group: Arc<dyn GroupConsumer> = consumer.clone();
    if let Some(txn) = &txn {
        txn.set_consumer(&group);
    }
    ensure_topics(&config, consumer.as_ref()).await;
    let changelog = match &dedup {
        Some(_) if config.idempotency.changelog => {
            // A broker away at start is waited for (not ready meanwhile).
            let mut backoff = Duration::from_millis(500);
            loop {
                match Changelog::open(&config, obs.metrics.clone()).await {
                    Ok(c) => {
                        obs.health.clear_problem("changelog");
                        break Some(Arc::new(c));
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        error!(error = %e, "cannot open the idempotency changelog; retrying");
                        obs.health.set_problem("changelog", e);
                        tokio::select! {
                            _ = &mut shutdown => {
                                obs.health.clear_problem("changelog");
                                return Ok(());
                            }
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
        _ => None,
    };
    if let (Some(txn), Some(changelog)) = (&txn, &changelog) {
        txn.set_changelog(changelog.clone());
    }
    let state = match &dedup {
        Some(d) => Some(Arc::new(
            StateStore::open(d.clone(), obs.metrics.clone())
                .context("cannot open the handlers' state")?,
        )),
        None => None,
    };
    if let (Some(txn), Some(state)) = (&txn, &state) {
        txn.set_state(state.clone());
    }
    for h in handlers.iter().filter(|h| h.stateful) {
        if state.is_none() {
            warn!(handler = %h.name, "the handler imports weir:plugin/state, but there is no state without the idempotency store (idempotency.enabled = false): events whose call uses it fail as state-unavailable");
        } else if h.config_entry.retry_mode == crate::config::RetryMode::Topic {
            warn!(handler = %h.name, "the handler imports weir:plugin/state and retries through a retry topic: events handled from the retry topic have no state (they fail as state-unavailable if they use it); use retry_mode = \"blocking\"");
        } else if changelog.is_none() {
            warn!(handler = %h.name, "the handler's state stays in this instance's store (idempotency.changelog = false): it does not move with its partitions");
        }
    }
    let topics = config.topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = stats.subscribed.set(Instant::now());
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
        state,
        dedup,
        changelog,
        txn: txn.clone(),
        stats,
        handler_metrics: handlers
            .iter()
            .map(|h| (h.name.clone(), obs.handler_metrics(h)))
            .collect(),
        obs,
    });
    // Offsets are committed periodically, or, exactly-once, with each
    // transaction.
    let committer_stop = Arc::new(AtomicBool::new(false));
    let (commit_task, committer) = match &txn {
        None => (
            Some(commit::every(
                consumer.clone(),
                shared.config.pipeline.commit_interval(),
            )),
            None,
        ),
        Some(txn) => (None, Some(txn.spawn_committer(committer_stop.clone()))),
    };
    // At-least-once never rewinds (its sender lives as long as the loop).
    let (_never, no_rewind) = watch::channel(None);
    let mut rewound = match &txn {
        Some(txn) => txn.rewound(),
        None => no_rewind,
    };

    let mut resume_tick = tokio::time::interval(Duration::from_millis(20));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(10));
    let mut over_since: Option<Instant> = None;
    loop {
        // Over the total bound the loop first stops taking records instead
        // of pausing the partitions: librdkafka stops fetching at its own
        // prefetch bound and keeps what it fetched, while a pause drops a
        // partition's prefetch and the fetching after the resume left every
        // worker idle for a while (docs/benchmarks.md, "2026-11-29 (later)").
        // Held longer than `source::HOLD`, it takes records again and pauses them as
        // before, so a rebalance is not kept waiting behind slow handlers.
        let over = workers.over_total.load(Ordering::Relaxed);
        let held = over_since.is_some();
        let take = taking(over, &mut over_since, Instant::now());
        if !held && over_since.is_some() {
            shared.stats.holds.fetch_add(1, Ordering::Relaxed);
            debug!("over the total bound: holding off taking records");
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = halted.changed() => break,
            _ = rewound.changed() => break,
            msg = consumer.recv(), if take => {
                // The records already fetched are taken in one pass of this
                // loop, not one pass each. Each is handed over before the
                // next poll, which may run a rebalance callback.
                let mut next = Some(msg);
                let mut taken = 0;
                while let Some(msg) = next.take() {
                    match msg {
                        Ok(msg) => hand_over(&shared, &group, &workers, Record::from_message(&msg)),
                        Err(e) => group::consumer_error(&shared, &consumer, e),
                    }
                    taken += 1;
                    if taken < BURST {
                        next = consumer.recv().now_or_never();
                    }
                }
            }
            _ = resume_tick.tick() => unpark(group.as_ref(), &workers, &shared),
            _ = stats_tick.tick() => shared.stats.log_progress(),
        }
    }

    let halt_reason = shared.halt.reason();
    // A halt wins over a rewind (a fenced producer does both).
    let rewind = rewound.borrow().clone().filter(|_| halt_reason.is_none());
    if rewind.is_none() {
        shared.obs.health.stopping.store(true, Ordering::Relaxed);
    }
    if let Some(task) = commit_task {
        task.abort();
    }
    if let (Some(txn), Some(thread)) = (&txn, committer) {
        txn.stop_committer(&committer_stop);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    let mut all: Vec<Worker> = {
        let mut map = workers.map.lock().unwrap();
        map.drain()
            .map(|(_, mut w)| {
                w.close(&workers);
                w
            })
            .collect()
    };
    if let Some(reason) = rewind {
        // The transaction aborted: nothing of the events in hand is sent
        // any more, and the partitions start again from their committed
        // offsets in the rebuilt pipeline.
        let deadline = Instant::now() + shared.config.pipeline.drain_timeout();
        group::blocking(|| {
            for w in &all {
                w.fence.close();
            }
            drain(&mut all, deadline)
        });
        return Err(Rewound(reason).into());
    }
    // A broken producer finishes nothing more: what is final is committed,
    // the rest is redelivered. Otherwise in-flight events are finished.
    let deadline = if shared.halt.is_immediate() {
        Instant::now()
    } else {
        info!("shutting down: finishing in-flight events");
        Instant::now() + shared.config.pipeline.drain_timeout()
    };
    let abandoned = drain(&mut all, deadline);
    let committed = match &txn {
        None => {
            commit_sync(consumer.as_ref());
            true
        }
        Some(txn) if !shared.halt.is_immediate() => {
            let txn = txn.clone();
            let fences: Vec<Arc<Fence>> = all.iter().map(|w| w.fence.clone()).collect();
            tokio::task::spawn_blocking(move || {
                for f in fences {
                    f.close();
                }
                txn.commit()
            })
            .await
            .unwrap_or(false)
        }
        Some(_) => false,
    };
    shared.stats.log_progress();
    if let Some(reason) = halt_reason {
        anyhow::bail!("stopped: {reason}");
    }
    if abandoned > 0 {
        return Err(Unfinished(abandoned).into());
    }
    if !committed {
        warn!("the last transaction did not commit: its events are handled again after a restart");
        return Ok(());
    }
    info!("offsets committed; stopped");
    Ok(())
}
