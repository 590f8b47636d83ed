//! Sinks: where a pipeline's rows go. Every sink is an [`Output`]: it writes batches (with the
//! stream offsets they cover), says which offsets are durable and may be committed, and
//! finishes. A file that appears under its final name only when complete ([`file`]), Kafka
//! ([`kafka`]), rolled Parquet files ([`rolling`]); failed stream records go to a dead-letter
//! sink ([`dead_letter`]).

pub mod dead_letter;
pub mod file;
pub mod kafka;
pub mod rolling;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, plan_err};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::error::df_message;
use crate::spec::Sink;

pub use file::{SinkWriter, sink_for_path};

/// Offset ranges per (topic, partition): first and last offset consumed, inclusive.
pub type Ranges = BTreeMap<(String, i32), (i64, i64)>;

/// Next offset to read per (topic, partition): what a consumer commits.
pub type Offsets = BTreeMap<(String, i32), i64>;

/// Merges `more` into `ranges`.
pub fn merge_ranges(ranges: &mut Ranges, more: &Ranges) {
    for (tp, &(first, last)) in more {
        ranges
            .entry(tp.clone())
            .and_modify(|r| {
                r.0 = r.0.min(first);
                r.1 = r.1.max(last);
            })
            .or_insert((first, last));
    }
}

/// The offsets to commit once the records of `ranges` are done with: one past each last.
pub fn next_offsets(ranges: &Ranges) -> Offsets {
    ranges
        .iter()
        .map(|(tp, (_, last))| (tp.clone(), last + 1))
        .collect()
}

/// What a written batch came from.
#[derive(Default)]
pub struct Covers<'a> {
    /// The stream records the rows came from (empty for a bounded source).
    pub consumed: Ranges,
    /// The consumer's group, for a sink that commits the offsets in its own transaction.
    pub group: Option<&'a ConsumerGroupMetadata>,
}

/// How long [`Output::durable`] may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Right after a write: what is durable already, waiting only to bound what is pending
    /// (a Kafka sink keeps a few micro-batches unacknowledged).
    AfterWrite,
    /// The stream is idle: what is durable already, and files older than their age limit.
    Idle,
    /// Everything written (partitions revoked, end of a run): roll open files, wait for every
    /// acknowledgement.
    All,
}

/// A sink that rows are written to.
///
/// After a failed `write` or `durable` an output is failed for good: it writes and rolls
/// nothing more and reports nothing durable, so no offset is committed for rows that may not
/// have been written.
pub trait Output: Send {
    /// Writes a micro-batch's rows (all of them, or the output fails).
    fn write(&mut self, batches: &[RecordBatch], covers: Covers<'_>) -> Result<(), String>;

    /// Offsets whose rows became durable since the last call: the consumer may commit them.
    fn durable(&mut self, settle: Settle) -> Result<Offsets, String>;

    /// Makes everything durable and closes the output.
    fn finish(self: Box<Self>) -> Result<(), String>;
}

/// Options for [`open`].
#[derive(Default)]
pub struct OpenOptions {
    /// Brokers of a Kafka sink that names none (the stream source's).
    pub default_brokers: Option<String>,
    /// A Kafka sink produces in transactions under this id (exactly-once streams).
    pub transactional_id: Option<String>,
}

/// Opens `sink` for rows of `schema`.
pub fn open(
    sink: &Sink,
    schema: SchemaRef,
    options: OpenOptions,
) -> Result<Box<dyn Output>, String> {
    Ok(match sink {
        Sink::Kafka(k) => Box::new(kafka::KafkaOutput::new(k, &schema, options)?),
        Sink::RollingParquet(r) => Box::new(rolling::RollingWriter::new(r, schema)?),
        file => Box::new(SinkWriter::open(file, schema).map_err(|e| df_message(&e))?),
    })
}

/// The Kafka form of `offsets`, for a commit or a transaction.
pub fn topic_partitions(offsets: &Offsets) -> Result<TopicPartitionList, String> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), next) in offsets {
        tpl.add_partition_offset(t, *p, Offset::Offset(*next))
            .map_err(|e| e.to_string())?;
    }
    Ok(tpl)
}

/// The first failure of a sink (or of a stream). It stays: after it nothing more is written,
/// rolled or committed, since offsets might then cover rows that are not durable.
#[derive(Debug, Default)]
pub struct FirstFailure(Option<String>);

impl FirstFailure {
    /// Passes `result` on, keeping its error if it is the first.
    pub fn record<T>(&mut self, result: Result<T, String>) -> Result<T, String> {
        if let Err(e) = &result {
            self.set(e.clone());
        }
        result
    }

    /// Keeps `e` unless a failure came first.
    pub fn set(&mut self, e: String) {
        self.0.get_or_insert(e);
    }

    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Fails with "`doing` after a failure: ..." once a failure is kept.
    pub fn check(&self, doing: &str) -> Result<(), String> {
        match &self.0 {
            Some(e) => Err(format!("{doing} after a failure: {e}")),
            None => Ok(()),
        }
    }
}

/// Rows per Parquet row group.
pub const PARQUET_ROW_GROUP_ROWS: usize = 32 * 1024;

/// The type a sink writes for `t`: Arrow's view types as the plain types every reader knows
/// (`Utf8View` as `Utf8`, `BinaryView` as `Binary`), inside lists, structs and maps too.
/// DataFusion reads Parquet strings as views, and a file that declares `string_view` in its
/// Arrow schema is read back as views by pyarrow, whose kernels (sort, take) do not all take
/// them.
pub fn plain_type(t: &DataType) -> DataType {
    let field = |f: &FieldRef| -> FieldRef {
        Arc::new(f.as_ref().clone().with_data_type(plain_type(f.data_type())))
    };
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::ListView(f) | DataType::List(f) => DataType::List(field(f)),
        DataType::LargeListView(f) | DataType::LargeList(f) => DataType::LargeList(field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(field(f), *n),
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(field).collect()),
        DataType::Map(f, sorted) => DataType::Map(field(f), *sorted),
        DataType::Dictionary(k, v) => DataType::Dictionary(k.clone(), Box::new(plain_type(v))),
        other => other.clone(),
    }
}

/// `schema` with [`plain_type`]s.
pub fn plain_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_data_type(plain_type(f.data_type())))
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` with [`plain_type`]s (for a writer that takes each batch's own schema).
pub fn plain(batch: &RecordBatch) -> Result<RecordBatch> {
    to_plain(batch, &plain_schema(&batch.schema()))
}

/// `batch` cast to `schema` (its [`plain_schema`]); the columns already plain are kept as they are.
pub fn to_plain(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(Arc::clone(c))
            } else {
                datafusion::arrow::compute::cast(c, f.data_type())
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Checks at plan time that `schema` can be written to `sink`.
pub fn check_schema(sink: &Sink, schema: &Schema) -> Result<()> {
    if let Sink::Csv(_) = sink {
        for f in schema.fields() {
            if f.data_type().is_nested()
                || matches!(
                    f.data_type(),
                    DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                )
            {
                return plan_err!(
                    "CSV cannot hold column '{}' of type {}; write parquet, ipc or jsonl, or drop the column in a SQL step",
                    f.name(),
                    f.data_type()
                );
            }
        }
    }
    Ok(())
}

/// Makes a directory's entries durable (a file renamed or created in it): without this, a
/// crash after the rename can leave the old name on disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}
