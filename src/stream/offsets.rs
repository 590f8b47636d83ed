//! Offset bookkeeping: what the loop and the rebalance callback share, when offsets are
//! committed (only once the sink says their rows are durable), where an assignment resumes
//! (committed offsets; for exactly-once Parquet, the offsets recorded in the files; a start
//! timestamp), and what a revoke does (make everything durable, commit, forget the partitions).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use crate::metrics::metrics;
use crate::sink::{FirstFailure, Offsets, Output, Settle, kafka, rolling, topic_partitions};

/// State the rebalance callback shares with the loop: it flushes and commits before partitions
/// are revoked.
pub(super) struct Shared {
    pub(super) output: Box<dyn Output>,
    /// Next offset to commit per partition, for records whose output is durable.
    pub(super) uncommitted: Offsets,
    /// Bumped on every rebalance, so the loop drops buffered records of revoked partitions.
    pub(super) generation: u64,
    /// Partitions revoked since the loop last looked: their buffered records are dropped even
    /// when the partition is assigned again (it is then fetched again from the committed
    /// offset).
    pub(super) revoked: HashSet<(String, i32)>,
    /// Why the stream must stop: a sink write or roll failed (so nothing more is rolled or
    /// committed: the offsets might cover rows that are not durable), or an assignment could
    /// not find where to resume.
    pub(super) failed: FirstFailure,
    /// The partitions assigned now, when the last assignment came, and since when none are
    /// (a rebalance took them all: a member joined or left, the coordinator was unreachable).
    pub(super) assigned: HashSet<(String, i32)>,
    pub(super) last_assigned: Option<Instant>,
    pub(super) unassigned_since: Option<Instant>,
    /// Exactly-once Parquet: resume from the offsets recorded in the files.
    pub(super) resume_dir: Option<PathBuf>,
    pub(super) start_timestamp: Option<i64>,
}

impl Shared {
    /// Takes what the sink made durable and commits it. `settle`: how long the sink may wait
    /// (after a write, idle, or everything: rebalance and end of the run). Only a commit of
    /// everything reports its failure; one mid-stream leaves the offsets for the next.
    pub(super) fn settle_and_commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        settle: Settle,
    ) -> Result<(), String> {
        self.failed.check("not committing")?;
        let durable = self.output.durable(settle);
        let durable = self.failed.record(durable)?;
        self.uncommitted.extend(durable);
        let committed = commit(consumer, &mut self.uncommitted);
        if settle == Settle::All {
            return committed;
        }
        soft(committed);
        Ok(())
    }
}

/// A commit that failed mid-stream (a broker away, a coordinator moving) is not the end of the
/// stream: the offsets stay in `uncommitted` and go with the next commit. Only the last commit
/// of a run (and of a revoke) is reported.
fn soft(committed: Result<(), String>) {
    if let Err(e) = committed {
        metrics().commit_failures.inc();
        tracing::warn!(error = %e, "commit failed; the offsets are kept for the next one");
    }
}

fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &mut Offsets,
) -> Result<(), String> {
    if offsets.is_empty() {
        return Ok(());
    }
    let tpl = topic_partitions(offsets)?;
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| format!("committing offsets: {e}"))?;
    metrics().commits.inc();
    offsets.clear();
    Ok(())
}

pub(super) struct StreamContext {
    pub(super) shared: Arc<Mutex<Shared>>,
}

impl ClientContext for StreamContext {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        metrics().consumer_lag.set(lag);
    }
}

impl StreamContext {
    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut shared = self.shared.lock().expect("stream state");
        shared.generation += 1;
        shared.last_assigned = Some(Instant::now());
        shared.unassigned_since = None;
        shared.assigned.extend(partitions(tpl));
        let needs_committed = shared.resume_dir.is_some() || shared.start_timestamp.is_some();
        if needs_committed && tpl.count() > 0 {
            let committed = match consumer.committed_offsets(tpl.clone(), kafka::BROKER_TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    // Resuming from a guess would read records twice (or skip them): stop.
                    let e = format!("reading the committed offsets of an assignment: {e}");
                    tracing::error!(error = %e, "cannot tell where to resume");
                    shared.failed.set(e);
                    return;
                }
            };
            let committed: HashMap<(String, i32), i64> = committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect();
            if let Some(dir) = &shared.resume_dir {
                match rolling::recorded_next_offsets(dir) {
                    Ok(files) => {
                        let assigned: Vec<(String, i32)> = tpl
                            .elements()
                            .iter()
                            .map(|e| (e.topic().to_string(), e.partition()))
                            .collect();
                        for tp in assigned {
                            if let Some(&f) = files.get(&tp)
                                && committed.get(&tp).is_none_or(|&c| f > c)
                            {
                                tracing::info!(
                                    topic = tp.0,
                                    partition = tp.1,
                                    offset = f,
                                    "resuming from the offsets recorded in the output files"
                                );
                                let _ = tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(f));
                            }
                        }
                    }
                    Err(e) => {
                        let e = format!("reading the offsets recorded in the output files: {e}");
                        tracing::error!(error = %e, "cannot tell where to resume");
                        shared.failed.set(e);
                    }
                }
            } else if let Some(ts) = shared.start_timestamp {
                let mut query = TopicPartitionList::new();
                for e in tpl.elements() {
                    if !committed.contains_key(&(e.topic().to_string(), e.partition())) {
                        let _ = query.add_partition_offset(
                            e.topic(),
                            e.partition(),
                            Offset::Offset(ts),
                        );
                    }
                }
                if query.count() > 0 {
                    match consumer.offsets_for_times(query, kafka::BROKER_TIMEOUT) {
                        Ok(found) => {
                            for e in found.elements() {
                                let _ =
                                    tpl.set_partition_offset(e.topic(), e.partition(), e.offset());
                            }
                        }
                        Err(e) => {
                            let e = format!("looking up offsets for the start timestamp: {e}");
                            tracing::error!(error = %e, "cannot tell where to start");
                            shared.failed.set(e);
                        }
                    }
                }
            }
        }
        tracing::info!(partitions = ?tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect::<Vec<_>>(), "assigned");
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut guard = self.shared.lock().expect("stream state");
        let shared = &mut *guard;
        shared.generation += 1;
        let revoked = partitions(tpl);
        shared.assigned.retain(|p| !revoked.contains(p));
        shared.revoked.extend(revoked);
        if shared.assigned.is_empty() {
            shared.unassigned_since = Some(Instant::now());
        }
        // Flush before the partitions go: wait for every acknowledgement / roll open files,
        // then commit what they hold. After a sink failure, nothing: the new owner reads
        // again from the last commit.
        match shared.settle_and_commit(consumer, Settle::All) {
            Ok(()) => tracing::info!("partitions revoked"),
            Err(e) => tracing::error!(
                error = %e,
                "partitions revoked without a commit; their uncommitted records will be read again"
            ),
        }
        // What could not be committed for them now belongs to their next owner: a later
        // commit by this consumer would move the next owner's offsets.
        let revoked = &shared.revoked;
        shared.uncommitted.retain(|tp, _| !revoked.contains(tp));
    }
}

impl ConsumerContext for StreamContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying a rebalance");
        }
    }
}

/// The (topic, partition) pairs of a list.
pub(super) fn partitions(tpl: &TopicPartitionList) -> HashSet<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}
