//! Streams: a Kafka source consumed in micro-batches, each run through the pipeline's plan (the
//! same SQL steps and operator projections as a file source), written to a streaming sink, and
//! only then committed.
//!
//! One thread polls the consumer, closes micro-batches by rows or wait, runs the plan, writes
//! the sink and commits, in that order. Consumption therefore never runs ahead of the model:
//! librdkafka's prefetch queue (bounded by `queued.max.messages.kbytes`) is the only buffer,
//! and memory stays flat however slow the operators are. While the plan runs (on the runtime)
//! the thread keeps serving the consumer — heartbeats, `max.poll.interval.ms`, rebalances —
//! and pauses the partitions of a long batch; a rebalance that takes a partition of the
//! running batch discards the batch's rows, to be read again.

pub mod devbroker;
mod offsets;
pub mod table;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int32Type, Int64Type, Schema};
use datafusion::dataframe::DataFrame;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::metrics::metrics;
use crate::ops::OperatorSet;
use crate::sink::dead_letter::DeadLetters;
use crate::sink::{self, Covers, Offsets, OpenOptions, Ranges, Settle, kafka};
use crate::source::kafka::{self as decode, Decoder, Record};
use crate::spec::{DeadLetter, Delivery, OnError, Pipeline, Sink, Source, StartPosition};
use offsets::{Shared, StreamContext};

/// How often the consumer is served while a micro-batch runs.
const SERVE_EVERY: Duration = Duration::from_millis(100);
/// How long a micro-batch runs before its partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// How long a run bounded by `until_idle` waits to be assigned partitions again after a
/// rebalance took them all, before it stops anyway.
const UNASSIGNED_WAIT: Duration = Duration::from_secs(60);

/// Bounds on a stream run, for tests and backfills.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Stop after this many records (the last micro-batch is cut there).
    pub max_records: Option<u64>,
    /// Stop when no record has arrived for this long (counted from the first assignment, and
    /// from each later one; time without any partition assigned does not count, up to a
    /// minute).
    pub until_idle: Option<Duration>,
    /// No status line.
    pub quiet: bool,
}

/// What a finished stream run did.
#[derive(Debug, Clone, Default)]
pub struct StreamSummary {
    pub records_in: u64,
    pub rows_out: u64,
    pub batches: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    pub elapsed: Duration,
    /// From the first record's arrival to the end (without the group join before it).
    pub active: Duration,
}

/// What `on_error` resolves to.
pub fn on_error(p: &Pipeline) -> OnError {
    p.on_error.unwrap_or(if p.dead_letter.is_some() {
        OnError::DeadLetter
    } else {
        OnError::Skip
    })
}

fn parse_duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{what} '{s}': {e} (e.g. 500ms, 2s, 1m)"))
}

fn parse_start(s: &StartPosition) -> Result<Option<i64>, String> {
    match s {
        StartPosition::Timestamp(t) => humantime::parse_rfc3339_weak(t)
            .map(|t| {
                Some(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                )
            })
            .map_err(|e| {
                format!("start timestamp '{t}': {e} (use RFC 3339, e.g. 2026-11-26T12:00:00Z)")
            }),
        _ => Ok(None),
    }
}

/// Plan-time checks of a stream pipeline against its output schema: (YAML path, message).
pub fn check(p: &Pipeline, output: &Schema) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    // The streaming sinks, whatever the source.
    match &p.sink {
        Sink::Kafka(s) => {
            if s.brokers.is_none() && !p.is_stream() {
                problems.push((
                    "sink.kafka".into(),
                    "give `brokers:` (only a kafka source has brokers to default to)".into(),
                ));
            }
            if let Err(e) = kafka::RecordEncoder::new(s, output) {
                problems.push(("sink.kafka".into(), e));
            }
            for (key, why) in kafka::conflicting_properties(&s.properties, kafka::PRODUCER_SETTINGS)
            {
                problems.push((format!("sink.kafka.properties.{key}"), why));
            }
        }
        Sink::RollingParquet(r) => {
            if let Err(e) = parse_duration("max_age", &r.max_age) {
                problems.push(("sink.rolling_parquet.max_age".into(), e));
            }
            if let Some(col) = &r.partition_by {
                if output.index_of(col).is_err() {
                    problems.push((
                        "sink.rolling_parquet.partition_by".into(),
                        format!("no column '{col}' in the output"),
                    ));
                }
                if p.delivery == Delivery::ExactlyOnce {
                    problems.push((
                        "sink.rolling_parquet.partition_by".into(),
                        "exactly_once needs one file per roll: remove partition_by or use at_least_once".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    let Source::Kafka(k) = &p.source else {
        for (key, set) in [
            ("on_error", p.on_error.is_some()),
            ("dead_letter", p.dead_letter.is_some()),
            ("delivery", p.delivery != Delivery::AtLeastOnce),
        ] {
            if set {
                problems.push((
                    key.to_string(),
                    format!("{key} applies to kafka sources; a file source writes null where an operator cannot process a row"),
                ));
            }
        }
        return problems;
    };
    if !p.sink.is_stream() {
        problems.push((
            format!("sink.{}", p.sink.format()),
            "a kafka source needs a streaming sink: kafka or rolling_parquet".into(),
        ));
    }
    let settings = kafka::consumer_settings(p.delivery == Delivery::ExactlyOnce);
    for (key, why) in kafka::conflicting_properties(&k.properties, &settings) {
        problems.push((format!("source.kafka.properties.{key}"), why));
    }
    if let Some(DeadLetter::Kafka(d)) = &p.dead_letter {
        for (key, why) in kafka::conflicting_properties(&d.properties, kafka::PRODUCER_SETTINGS) {
            problems.push((format!("dead_letter.kafka.properties.{key}"), why));
        }
    }
    if k.max_batch_rows == 0 {
        problems.push((
            "source.kafka.max_batch_rows".into(),
            "must be at least 1".into(),
        ));
    }
    if let Err(e) = parse_duration("max_batch_wait", &k.max_batch_wait) {
        problems.push(("source.kafka.max_batch_wait".into(), e));
    }
    if let Err(e) = parse_start(&k.start) {
        problems.push(("source.kafka.start".into(), e));
    }
    if k.topics.is_empty() {
        problems.push((
            "source.kafka.topics".into(),
            "give at least one topic".into(),
        ));
    }
    if on_error(p) == OnError::DeadLetter && p.dead_letter.is_none() {
        problems.push((
            "on_error".into(),
            "on_error: dead_letter needs a dead_letter sink (kafka topic or jsonl file)".into(),
        ));
    }
    problems
}

fn record_of<M: Message>(m: &M, topics: &mut HashMap<String, Arc<str>>) -> Record {
    let topic = match topics.get(m.topic()) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = Arc::from(m.topic());
            topics.insert(m.topic().to_string(), Arc::clone(&t));
            t
        }
    };
    Record {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Consumed offset ranges of `records`.
fn ranges_of(records: &[Record]) -> Ranges {
    let mut r = Ranges::new();
    for rec in records {
        r.entry((rec.topic.to_string(), rec.partition))
            .and_modify(|(f, l)| {
                *f = (*f).min(rec.offset);
                *l = (*l).max(rec.offset);
            })
            .or_insert((rec.offset, rec.offset));
    }
    r
}

/// Runs a planned stream pipeline until stopped (`stop`), `max_records`, or idle.
/// Blocking: call it from a thread that may block (it drives async work with `runtime`).
pub fn run(
    pipeline: &Pipeline,
    frame: DataFrame,
    operators: &OperatorSet,
    options: &StreamOptions,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> Result<StreamSummary, String> {
    let started = Instant::now();
    let Source::Kafka(source) = &pipeline.source else {
        return Err("not a stream pipeline".into());
    };
    let decoder = Decoder::new(source)?;
    let slot = table_slot(&frame)?;
    let output_schema = Arc::new(frame.schema().as_arrow().clone());
    let policy = on_error(pipeline);
    let exactly_once = pipeline.delivery == Delivery::ExactlyOnce;
    let max_rows = source.max_batch_rows.max(1);
    let max_wait = parse_duration("max_batch_wait", &source.max_batch_wait)?;

    let output = match &pipeline.sink {
        Sink::Kafka(_) | Sink::RollingParquet(_) => sink::open(
            &pipeline.sink,
            Arc::clone(&output_schema),
            OpenOptions {
                default_brokers: Some(source.brokers.clone()),
                // Exactly-once into Kafka: transactions under an id of this run's own.
                transactional_id: exactly_once.then(|| {
                    format!(
                        "ferry-{}-{}-{}",
                        source.group_id,
                        std::process::id(),
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos())
                    )
                }),
            },
        )?,
        other => return Err(format!("sink {} cannot take a stream", other.format())),
    };
    let resume_dir = match (&pipeline.sink, exactly_once) {
        (Sink::RollingParquet(r), true) => Some(r.dir.clone()),
        _ => None,
    };
    let mut dead = match (&pipeline.dead_letter, policy) {
        (Some(d), OnError::DeadLetter) => Some(DeadLetters::open(d, source)?),
        _ => None,
    };
    let shared = Arc::new(Mutex::new(Shared {
        output,
        uncommitted: Offsets::new(),
        generation: 0,
        revoked: HashSet::new(),
        failed: Default::default(),
        assigned: HashSet::new(),
        last_assigned: None,
        unassigned_since: None,
        resume_dir,
        start_timestamp: parse_start(&source.start)?,
    }));

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &source.brokers)
        .set("group.id", &source.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if source.start == StartPosition::Latest {
                "latest"
            } else {
                "earliest"
            },
        )
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "5000");
    for (k, v) in &source.properties {
        config.set(k, v);
    }
    // What delivery rests on wins over `properties` (validation refuses a conflict).
    for (k, v) in kafka::consumer_settings(exactly_once) {
        config.set(k, v);
    }
    let consumer: BaseConsumer<StreamContext> = config
        .create_with_context(StreamContext {
            shared: Arc::clone(&shared),
        })
        .map_err(|e| format!("creating the Kafka consumer for {}: {e}", source.brokers))?;
    let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| format!("subscribing to {}: {e}", source.topics.join(", ")))?;
    tracing::info!(topics = ?source.topics, group = %source.group_id, "consuming");

    let status = status_line(options.quiet);
    let mut summary = StreamSummary::default();
    let mut topic_names = HashMap::new();
    let mut pending: Vec<Record> = Vec::new();
    let mut first_at: Option<Instant> = None;
    let mut last_record: Option<Instant> = None;
    let mut seen_generation = 0;
    let mut last_status = Instant::now();
    let mut first_record: Option<Instant> = None;
    let ctx = Batcher {
        max_rows,
        frame: &frame,
        slot: &slot,
        decoder: &decoder,
        operators,
        policy,
        runtime: &runtime,
        consumer: &consumer,
        shared: &shared,
    };
    loop {
        let cap_reached = options
            .max_records
            .is_some_and(|m| summary.records_in + pending.len() as u64 >= m);
        if stop.load(Ordering::Relaxed) || cap_reached {
            break;
        }
        let wait = first_at
            .map_or(Duration::from_millis(100), |t| {
                max_wait.saturating_sub(t.elapsed())
            })
            .min(Duration::from_millis(100));
        let polled = consumer.poll(wait);
        if let Some(e) = shared.lock().expect("stream state").failed.get() {
            return Err(e.to_string());
        }
        // Rebalances first: a message returned by the same poll as an assignment is fetched
        // from the new position and must not be dropped with the revoked buffer.
        ctx.drop_revoked(&mut seen_generation, &mut pending);
        if pending.is_empty() {
            first_at = None;
        }
        match polled {
            Some(Ok(m)) => {
                pending.push(record_of(&m, &mut topic_names));
                first_at.get_or_insert_with(Instant::now);
                first_record.get_or_insert_with(Instant::now);
                last_record = Some(Instant::now());
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer");
            }
            None => {}
        }
        let full = pending.len() >= max_rows
            || options
                .max_records
                .is_some_and(|m| summary.records_in + pending.len() as u64 >= m);
        let due = first_at.is_some_and(|t| t.elapsed() >= max_wait);
        if full || due {
            let cut = options
                .max_records
                .map_or(max_rows, |m| {
                    max_rows.min(m.saturating_sub(summary.records_in) as usize)
                })
                .max(1);
            let records: Vec<Record> = pending.drain(..cut.min(pending.len())).collect();
            ctx.process(
                records,
                &mut pending,
                &mut seen_generation,
                &mut dead,
                &mut summary,
            )?;
            // Records that arrived while the batch ran open the next one; idleness counts
            // from the end of the batch.
            first_at = (!pending.is_empty()).then(Instant::now);
            last_record = Some(Instant::now());
        } else if pending.is_empty() {
            // Idle: roll old files (and commit what they hold).
            let mut guard = shared.lock().expect("stream state");
            let s = &mut *guard;
            s.settle_and_commit(&consumer, Settle::Idle)?;
            let (idle_since, unassigned_since) =
                (last_record.max(s.last_assigned), s.unassigned_since);
            drop(guard);
            if let Some(limit) = options.until_idle {
                match unassigned_since {
                    // A rebalance took every partition (an outage, a member joining): waiting
                    // to be assigned again is not idleness, for a while.
                    Some(since) => {
                        let bound = limit.max(UNASSIGNED_WAIT);
                        if since.elapsed() >= bound {
                            tracing::warn!("no partitions assigned for {bound:?}; stopping");
                            break;
                        }
                    }
                    None => {
                        if idle_since.is_some_and(|since| since.elapsed() >= limit) {
                            tracing::info!("idle for {limit:?}; stopping");
                            break;
                        }
                    }
                }
            }
        }
        if last_status.elapsed() >= Duration::from_millis(250) {
            last_status = Instant::now();
            status.set_message(format!(
                "{} records in, {} rows out, {} dead-lettered, {} skipped, lag {}  ({:.0} records/s)",
                summary.records_in,
                summary.rows_out,
                summary.dead_lettered,
                summary.skipped,
                metrics().consumer_lag.get(),
                summary.records_in as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
    // Drain: what is buffered (up to the cap), then flush and commit. Records that arrive
    // while it runs stay uncommitted, for the next run.
    if let Some(m) = options.max_records {
        pending.truncate(m.saturating_sub(summary.records_in) as usize);
    }
    if !pending.is_empty() {
        let records = std::mem::take(&mut pending);
        ctx.process(
            records,
            &mut pending,
            &mut seen_generation,
            &mut dead,
            &mut summary,
        )?;
    }
    shared
        .lock()
        .expect("stream state")
        .settle_and_commit(&consumer, Settle::All)?;
    status.finish_and_clear();
    drop(consumer);
    summary.elapsed = started.elapsed();
    summary.active = first_record.map_or(Duration::ZERO, |t| t.elapsed());
    Ok(summary)
}

/// The micro-batch slot of the plan's source table.
fn table_slot(frame: &DataFrame) -> Result<Arc<Mutex<Vec<RecordBatch>>>, String> {
    use datafusion::common::tree_node::TreeNode;
    use datafusion::logical_expr::LogicalPlan;
    let mut found = None;
    frame
        .logical_plan()
        .apply(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Ok(provider) = datafusion::datasource::source_as_provider(&scan.source)
                && let Some(t) = provider.downcast_ref::<table::MicroBatchTable>()
            {
                found = Some(t.slot());
                return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
        .map_err(|e| e.to_string())?;
    found.ok_or_else(|| "the plan does not read the stream's table".to_string())
}

fn status_line(quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn plan_panicked() -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Execution(
        "the micro-batch's plan stopped without a result (it panicked)".into(),
    )
}

/// Everything one micro-batch needs.
struct Batcher<'a> {
    /// `max_batch_rows`: how many records of the next batch are taken while one runs.
    max_rows: usize,
    frame: &'a DataFrame,
    slot: &'a Arc<Mutex<Vec<RecordBatch>>>,
    decoder: &'a Decoder,
    operators: &'a OperatorSet,
    policy: OnError,
    runtime: &'a tokio::runtime::Handle,
    consumer: &'a BaseConsumer<StreamContext>,
    shared: &'a Arc<Mutex<Shared>>,
}

impl Batcher<'_> {
    /// The partitions assigned now (none when the assignment cannot be read).
    fn assigned(&self) -> HashSet<(String, i32)> {
        self.consumer
            .assignment()
            .map(|a| offsets::partitions(&a))
            .unwrap_or_default()
    }

    /// After a rebalance, drops the buffered records of partitions revoked since the last look
    /// (and of partitions no longer assigned): their new owner, or this consumer re-assigned
    /// from the committed offset, reads them again. Returns the revoked partitions.
    fn drop_revoked(
        &self,
        seen_generation: &mut u64,
        pending: &mut Vec<Record>,
    ) -> HashSet<(String, i32)> {
        let (generation, revoked) = {
            let mut s = self.shared.lock().expect("stream state");
            (s.generation, std::mem::take(&mut s.revoked))
        };
        if generation == *seen_generation {
            return revoked;
        }
        *seen_generation = generation;
        if !pending.is_empty() {
            let assigned = self.assigned();
            let before = pending.len();
            pending.retain(|r| {
                let tp = (r.topic.to_string(), r.partition);
                assigned.contains(&tp) && !revoked.contains(&tp)
            });
            if pending.len() < before {
                tracing::info!(
                    dropped = before - pending.len(),
                    "buffered records of revoked partitions left to their new owner"
                );
            }
        }
        revoked
    }

    /// Runs the plan over the micro-batch in `slot` on the runtime while this thread keeps
    /// serving the consumer, so a batch longer than `max.poll.interval.ms` does not get it
    /// evicted from the group. Meanwhile the next batch's records are taken (into `pending`, up
    /// to `max_batch_rows`), so polling overlaps the plan; once that is full and the batch has
    /// run for a while, the partitions are paused and the consumer only served. Rebalance
    /// callbacks run here as they come. Returns the plan's result and the partitions revoked
    /// while it ran.
    fn run_plan(
        &self,
        pending: &mut Vec<Record>,
        seen_generation: &mut u64,
    ) -> (
        datafusion::error::Result<Vec<RecordBatch>>,
        HashSet<(String, i32)>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let work = self.frame.clone().collect();
        self.runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        let started = Instant::now();
        let mut revoked = HashSet::new();
        let mut paused: Option<TopicPartitionList> = None;
        let mut topics = HashMap::new();
        let result = loop {
            match rx.try_recv() {
                Ok(result) => break result,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break Err(plan_panicked()),
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            // Until the next batch is full, take its records while this one runs (polling
            // overlaps the plan); then only serve the consumer.
            let filling = paused.is_none() && pending.len() < self.max_rows;
            let polled = if filling {
                self.consumer.poll(Duration::from_millis(1))
            } else {
                match rx.recv_timeout(SERVE_EVERY) {
                    Ok(result) => break result,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(plan_panicked());
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                self.consumer.poll(Duration::ZERO)
            };
            revoked.extend(self.drop_revoked(seen_generation, pending));
            match polled {
                Some(Ok(m)) => pending.push(record_of(&m, &mut topics)),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer"),
                None => {}
            }
            // A long batch with the next one full: pause what is assigned now (a rebalance
            // brings unpaused partitions).
            if pending.len() >= self.max_rows
                && started.elapsed() >= PAUSE_AFTER
                && let Ok(assigned) = self.consumer.assignment()
                && paused
                    .as_ref()
                    .is_none_or(|p| p.to_topic_map() != assigned.to_topic_map())
            {
                match self.consumer.pause(&assigned) {
                    Ok(()) => {
                        tracing::debug!("partitions paused while a long micro-batch runs");
                        paused = Some(assigned);
                    }
                    Err(e) => tracing::warn!(error = %e, "pausing partitions"),
                }
            }
        };
        if paused.is_some()
            && let Ok(assigned) = self.consumer.assignment()
            && let Err(e) = self.consumer.resume(&assigned)
        {
            tracing::warn!(error = %e, "resuming partitions");
        }
        (result, revoked)
    }

    /// Decode → plan → dead letters → sink → commit, for one micro-batch. Records that arrive
    /// while the plan runs join `pending`.
    fn process(
        &self,
        records: Vec<Record>,
        pending: &mut Vec<Record>,
        seen_generation: &mut u64,
        dead: &mut Option<DeadLetters>,
        summary: &mut StreamSummary,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let m = metrics();
        let (batch, bad) = self.decoder.decode(&records);
        let t_decode = t0.elapsed();
        let mut failed: Vec<(usize, String)> = bad
            .into_iter()
            .map(|b| {
                m.error("decode");
                (b.index, b.reason)
            })
            .collect();
        *self.slot.lock().expect("micro-batch slot") = vec![batch];
        let (result, revoked) = self.run_plan(pending, seen_generation);
        self.slot.lock().expect("micro-batch slot").clear();
        let mut outputs =
            result.map_err(|e| format!("running the pipeline on a micro-batch: {e}"))?;
        // Rows an operator could not process, located by their lineage (taken even from a
        // discarded batch, so they are not laid at the next one's door).
        let failures: Vec<_> = self
            .operators
            .built()
            .flat_map(|op| op.take_failures())
            .collect();
        if self.discard_if_revoked(&records, &revoked, pending) {
            return Ok(());
        }
        let t_plan = t0.elapsed();

        let mut failed_rows: HashSet<(String, i32, i64)> = HashSet::new();
        if !failures.is_empty() {
            let index: HashMap<(&str, i32, i64), usize> = records
                .iter()
                .enumerate()
                .map(|(i, r)| ((&*r.topic, r.partition, r.offset), i))
                .collect();
            for f in failures {
                m.error("operator");
                if let Some((t, p, o)) = f.source
                    && let Some(&i) = index.get(&(t.as_str(), p, o))
                {
                    failed.push((i, format!("operator '{}': {}", f.operator, f.message)));
                    failed_rows.insert((t, p, o));
                }
            }
        }
        failed.sort_by_key(|(i, _)| *i);
        failed.dedup_by_key(|(i, _)| *i);
        if !failed.is_empty() {
            match self.policy {
                OnError::Fail => {
                    let (i, reason) = &failed[0];
                    let r = &records[*i];
                    return Err(format!(
                        "record {}[{}]@{}: {reason} (on_error: fail; {} bad record(s) in this batch, nothing from it was committed)",
                        r.topic,
                        r.partition,
                        r.offset,
                        failed.len()
                    ));
                }
                OnError::Skip => {
                    for (i, reason) in &failed {
                        let r = &records[*i];
                        tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, reason, "record skipped");
                    }
                    summary.skipped += failed.len() as u64;
                }
                OnError::DeadLetter => {
                    let letters: Vec<(&Record, String)> = failed
                        .iter()
                        .map(|(i, reason)| (&records[*i], reason.clone()))
                        .collect();
                    dead.as_mut()
                        .expect("dead_letter sink checked at plan time")
                        .write(&letters)?;
                    summary.dead_lettered += letters.len() as u64;
                    m.dead_letters.inc_by(letters.len() as u64);
                }
            }
            if !failed_rows.is_empty() {
                outputs = outputs
                    .iter()
                    .map(|b| drop_failed_rows(b, &failed_rows))
                    .collect();
            }
        }

        let consumed = ranges_of(&records);
        let rows: u64 = outputs.iter().map(|b| b.num_rows() as u64).sum();
        let group = self.consumer.group_metadata();
        let mut guard = self.shared.lock().expect("stream state");
        let s = &mut *guard;
        s.failed.check("not writing")?;
        // The batch's offsets become committable only once the sink says its rows are durable
        // (a transactional sink commits them itself).
        let written = s.output.write(
            &outputs,
            Covers {
                consumed,
                group: group.as_ref(),
            },
        );
        s.failed.record(written)?;
        let t_sink = t0.elapsed();
        s.settle_and_commit(self.consumer, Settle::AfterWrite)?;
        drop(guard);
        tracing::debug!(
            records = records.len(),
            rows,
            bad = failed.len(),
            decode_us = t_decode.as_micros() as u64,
            plan_us = (t_plan - t_decode).as_micros() as u64,
            sink_us = (t_sink - t_plan).as_micros() as u64,
            commit_us = (t0.elapsed() - t_sink).as_micros() as u64,
            "micro-batch done"
        );
        summary.records_in += records.len() as u64;
        summary.rows_out += rows;
        summary.batches += 1;
        m.records_in.inc_by(records.len() as u64);
        m.records_out.inc_by(rows);
        m.batches.inc();
        m.batch_seconds.observe(t0.elapsed().as_secs_f64());
        Ok(())
    }
}

impl Batcher<'_> {
    /// Whether a rebalance while the batch ran took any of its partitions: then none of its
    /// rows is written (their offsets may be read again already, by the new owner or by this
    /// consumer from the committed offset). Partitions of the batch that stayed assigned
    /// (cooperative rebalancing) are sought back to the batch's first offset, so all of it is
    /// read again.
    fn discard_if_revoked(
        &self,
        records: &[Record],
        revoked: &HashSet<(String, i32)>,
        pending: &mut Vec<Record>,
    ) -> bool {
        if revoked.is_empty() {
            return false;
        }
        let consumed = ranges_of(records);
        if !consumed.keys().any(|tp| revoked.contains(tp)) {
            return false;
        }
        let assigned = self.assigned();
        for ((topic, partition), (first, _)) in &consumed {
            let tp = (topic.clone(), *partition);
            if revoked.contains(&tp) || !assigned.contains(&tp) {
                continue;
            }
            pending.retain(|r| !(&*r.topic == topic && r.partition == *partition));
            if let Err(e) = self.consumer.seek(
                topic,
                *partition,
                Offset::Offset(*first),
                kafka::BROKER_TIMEOUT,
            ) {
                // Without the seek the batch's records of this partition would be skipped.
                let e = format!("seeking {topic}[{partition}] back to {first}: {e}");
                self.shared.lock().expect("stream state").failed.set(e);
            }
        }
        tracing::info!(
            records = records.len(),
            "a rebalance took partitions of the running micro-batch; its rows are left to be read again"
        );
        true
    }
}

/// `batch` without the rows whose lineage is in `failed` (when it still has lineage columns).
fn drop_failed_rows(batch: &RecordBatch, failed: &HashSet<(String, i32, i64)>) -> RecordBatch {
    let (Some(t), Some(p), Some(o)) = (
        batch.column_by_name(decode::TOPIC),
        batch.column_by_name(decode::PARTITION),
        batch.column_by_name(decode::OFFSET),
    ) else {
        return batch.clone();
    };
    let (t, p, o) = (
        t.as_string::<i32>(),
        p.as_primitive::<Int32Type>(),
        o.as_primitive::<Int64Type>(),
    );
    let drop: HashSet<usize> = (0..batch.num_rows())
        .filter(|&i| failed.contains(&(t.value(i).to_string(), p.value(i), o.value(i))))
        .collect();
    decode::without_rows(batch, &drop)
}
