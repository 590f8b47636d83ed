//! The pipeline file: what a user writes. Every field's doc comment is its user documentation and
//! ends up in `schemas/pipeline.schema.json`.

mod load;
pub mod locate;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{Diagnostic, Diagnostics, LoadedPipeline, deserialize_at, load_pipeline};

/// Column name → type, in the order the file gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Columns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> serde::de::Visitor<'de> for InOrder {
            type Value = Columns;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping of column name to type")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Columns, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    out.push(entry);
                }
                Ok(Columns(out))
            }
        }
        d.deserialize_map(InOrder)
    }
}

impl Serialize for Columns {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A pipeline: one source, optional SQL and operator steps applied in order, one sink.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Name of the pipeline; also the table name under which `ferry query` shows its output.
    pub name: String,
    /// Optional free text shown by `ferry validate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the rows come from.
    pub source: Source,
    /// Transformations applied in order. Each step sees the previous step's result as the table
    /// `input`.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Where the enriched rows go.
    pub sink: Sink,
    /// Streams only: what happens to a record that cannot be decoded, does not match the
    /// declared columns, or that an operator cannot process. Default: `dead_letter` when a
    /// `dead_letter` sink is given, otherwise `skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// Streams only: where bad records go, with the reason, their source topic, partition and
    /// offset, and the raw payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// Streams only: the delivery guarantee.
    #[serde(default)]
    pub delivery: Delivery,
}

impl Pipeline {
    /// Makes every relative path of the pipeline (source files and globs, `allow_roots`, the
    /// Kafka `schema` file, sink files and directories, the dead-letter file) relative to
    /// `base`, the directory of the pipeline file, as `model:` is relative to its manifest.
    /// Absolute paths are kept.
    pub fn resolve_paths(&mut self, base: &Path) {
        let path = |p: &mut PathBuf| *p = resolve(base, p);
        let text = |s: &mut String| *s = resolve(base, Path::new(s)).to_string_lossy().into();
        match &mut self.source {
            Source::Parquet(f) | Source::Ipc(f) | Source::Jsonl(f) => text(&mut f.path),
            Source::Csv(c) => text(&mut c.path),
            Source::Files(f) => {
                text(&mut f.path);
                f.allow_roots.iter_mut().for_each(path);
            }
            Source::Kafka(k) => k.schema.iter_mut().for_each(path),
        }
        match &mut self.sink {
            Sink::Parquet(s) => path(&mut s.path),
            Sink::Ipc(s) | Sink::Jsonl(s) | Sink::Csv(s) => path(&mut s.path),
            Sink::RollingParquet(r) => path(&mut r.dir),
            Sink::Kafka(_) => {}
        }
        if let Some(DeadLetter::Jsonl(f)) = &mut self.dead_letter {
            path(&mut f.path);
        }
    }

    /// Whether the source is an unbounded stream.
    pub fn is_stream(&self) -> bool {
        matches!(self.source, Source::Kafka(_))
    }
}

/// What to do with a record that cannot be processed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the pipeline with an error; nothing from the failing batch is committed.
    Fail,
    /// Leave the record out, log a warning and count it (`ferry_dead_letters_total` stays 0).
    Skip,
    /// Send the record to the `dead_letter` sink and go on.
    DeadLetter,
}

/// Delivery guarantees of a stream.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Source offsets are committed only after the sink durably holds what they cover; after a
    /// crash, the uncommitted tail is processed again (duplicates, never losses).
    #[default]
    AtLeastOnce,
    /// Kafka sink: each micro-batch and its source offsets are one Kafka transaction.
    /// `rolling_parquet` sink: files record the offset ranges they hold and ferry resumes from
    /// them. A crash at any point neither loses nor duplicates a record.
    ExactlyOnce,
}

/// A dead-letter sink.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeadLetter {
    /// A Kafka topic: value = the raw payload, key = the original key, headers
    /// `ferry.error`, `ferry.source.topic`, `ferry.source.partition`, `ferry.source.offset`.
    Kafka(KafkaDeadLetter),
    /// A JSON Lines file, appended to and synced after every batch: one object per record with
    /// `reason`, `topic`, `partition`, `offset`, `timestamp`, `key` and `payload` (or
    /// `payload_base64` when the payload is not UTF-8).
    Jsonl(FileSink),
}

/// A dead-letter topic.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaDeadLetter {
    /// Bootstrap brokers; default: the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// The topic.
    pub topic: String,
    /// librdkafka producer properties.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// Where rows come from: files read as one bounded table (paths relative to the pipeline
/// file's directory), or an unbounded Kafka stream.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// Apache Parquet files.
    Parquet(FileSource),
    /// Arrow IPC files (the file format, `.arrow`).
    Ipc(FileSource),
    /// Comma-separated values with a header row.
    Csv(CsvSource),
    /// JSON Lines: one JSON object per line.
    Jsonl(FileSource),
    /// Kafka topics, consumed in micro-batches. Besides the payload's columns, every row has the
    /// lineage columns `_topic`, `_partition`, `_offset` and `_timestamp`.
    Kafka(Box<KafkaSource>),
    /// Files of any kind (images, audio) as rows `path, size, modified, bytes, error`; bytes are
    /// read lazily, a small batch at a time.
    Files(FilesSource),
}

impl Source {
    /// The key the source is written under (`parquet`, `csv`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Parquet(_) => "parquet",
            Source::Ipc(_) => "ipc",
            Source::Csv(_) => "csv",
            Source::Jsonl(_) => "jsonl",
            Source::Kafka(_) => "kafka",
            Source::Files(_) => "files",
        }
    }
}

/// A Kafka source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics to read; an entry starting with `^` is a regular expression over topic names.
    pub topics: Vec<String>,
    /// Consumer group. Processes in one group share the topics' partitions.
    pub group_id: String,
    /// Where to start in a partition the group has no committed offset for. Committed offsets
    /// (and, for exactly-once Parquet, the offsets recorded in the output files) always win.
    #[serde(default)]
    pub start: StartPosition,
    /// How record values are decoded.
    #[serde(default)]
    pub format: PayloadFormat,
    /// Columns of `json` / `ipc` payloads, in order: name → type (`string`, `int64`, `float64`,
    /// `bool`, `binary`, `timestamp_ms`, `list<float32>`, ... or an Arrow type name). Fields
    /// of a JSON object that are not listed are ignored; a listed field that is missing is null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub columns: Option<Columns>,
    /// A JSON Schema file (an object with `properties`; `required` fields are non-null) giving
    /// the columns instead of `columns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<PathBuf>,
    /// A micro-batch closes at this many records ...
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// ... or this long after its first record arrived (`200ms`, `1s`), whichever comes first.
    #[serde(default = "default_max_batch_wait")]
    pub max_batch_wait: String,
    /// librdkafka consumer properties passed through (e.g. `session.timeout.ms`,
    /// `security.protocol`). ferry sets `enable.auto.commit=false`: it commits itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

fn default_max_batch_rows() -> usize {
    1024
}

fn default_max_batch_wait() -> String {
    "500ms".to_string()
}

/// Where a consumer starts in a partition without a committed offset.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The group's committed offset, else the earliest record.
    #[default]
    Committed,
    /// The earliest record still held by the broker.
    Earliest,
    /// Only records produced after the consumer joined.
    Latest,
    /// The first record at or after this time (RFC 3339, e.g. `2026-11-26T12:00:00Z`).
    Timestamp(String),
}

/// Encoding of Kafka record values.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// One JSON object per record.
    #[default]
    Json,
    /// An Arrow IPC stream per record (schema message + record batches); many rows per record.
    Ipc,
    /// No decoding: columns `key`, `value` (binary) and `headers` (list of key/value).
    Raw,
}

/// Files of one format.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// A file, a directory (every file in it with the format's extension) or a glob such as
    /// `data/*.parquet`.
    pub path: String,
}

/// A folder of files, one row per file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesSource {
    /// A file, a directory (every file under it) or a glob such as `photos/**/*.jpg`.
    pub path: String,
    /// Directories the files may be in once symbolic links are resolved; a file elsewhere gets
    /// a null `bytes` and the reason in `error`. Default: the path's own directory (the part
    /// before any glob character).
    #[serde(default)]
    pub allow_roots: Vec<std::path::PathBuf>,
}

/// CSV files.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvSource {
    /// A file, a directory or a glob.
    pub path: String,
    /// Field delimiter, one ASCII character.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Whether the first line holds the column names.
    #[serde(default = "yes")]
    pub has_header: bool,
}

fn default_delimiter() -> char {
    ','
}

fn yes() -> bool {
    true
}

/// One transformation. A step is either `sql` or `operator`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A SQL query over the table `input` (the previous step's rows), e.g.
    /// `SELECT id, text FROM input WHERE lang = 'en'`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// The name of an operator manifest (`operators/<name>.yaml`) to run over `inputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Columns passed to the operator, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Name of the column the operator adds (default: the operator's name). An existing column
    /// of that name is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Also add `<output>_operator` (the operator's name) and `<output>_model` (a BLAKE3 hash
    /// of its model directory's files), so that every row says what produced it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lineage: bool,
}

/// Where the rows are written. The file is written under a temporary name beside the target and
/// renamed into place once complete, so a crash never leaves a half-written file under the final
/// name.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Sink {
    /// One Parquet file.
    Parquet(ParquetSink),
    /// One Arrow IPC file.
    Ipc(FileSink),
    /// One JSON Lines file.
    Jsonl(FileSink),
    /// One CSV file with a header. Only flat columns (no lists or structs) can be written.
    Csv(FileSink),
    /// Streams: a Kafka topic, one record per row.
    Kafka(KafkaSink),
    /// Streams: Parquet files in a directory, rolled by rows, bytes or age.
    RollingParquet(RollingParquetSink),
}

impl Sink {
    /// The file a bounded sink writes (`None` for streaming sinks).
    pub fn path(&self) -> Option<&PathBuf> {
        match self {
            Sink::Parquet(s) => Some(&s.path),
            Sink::Ipc(s) | Sink::Jsonl(s) | Sink::Csv(s) => Some(&s.path),
            Sink::Kafka(_) | Sink::RollingParquet(_) => None,
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Sink::Parquet(_) => "parquet",
            Sink::Ipc(_) => "ipc",
            Sink::Jsonl(_) => "jsonl",
            Sink::Csv(_) => "csv",
            Sink::Kafka(_) => "kafka",
            Sink::RollingParquet(_) => "rolling_parquet",
        }
    }

    /// Whether this sink takes an unbounded stream.
    pub fn is_stream(&self) -> bool {
        matches!(self, Sink::Kafka(_) | Sink::RollingParquet(_))
    }
}

/// A Kafka sink.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// Bootstrap brokers; default: the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// The output topic.
    pub topic: String,
    /// Column whose value is the record key (strings and binary as they are, numbers as their
    /// decimal text); records with one key go to one partition. Default: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How each row becomes a record value.
    #[serde(default)]
    pub format: SinkFormat,
    /// For `raw`: the binary or string column written as the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Add lineage headers `ferry.source.topic`, `ferry.source.partition`,
    /// `ferry.source.offset` from the row's lineage columns (when a SQL step kept them).
    #[serde(default = "yes")]
    pub lineage_headers: bool,
    /// librdkafka producer properties (e.g. `compression.type`, `linger.ms`). The producer is
    /// always idempotent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// Encoding of Kafka sink record values.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// One JSON object per row, without the lineage columns (they go to headers).
    #[default]
    Json,
    /// One Arrow IPC stream (schema + one single-row batch) per row.
    Ipc,
    /// The `value` column's bytes.
    Raw,
}

/// Parquet files rolled in a directory. Each file is written as `.<name>.inprogress-<pid>` and
/// renamed into place when complete; its footer metadata `ferry.offsets` records the Kafka
/// offset ranges it holds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollingParquetSink {
    /// The directory.
    pub dir: PathBuf,
    /// Roll when a file holds this many rows.
    #[serde(default = "default_roll_rows")]
    pub max_rows: u64,
    /// Roll when a file reaches about this many bytes.
    #[serde(default = "default_roll_bytes")]
    pub max_bytes: u64,
    /// Roll when a file is this old (`30s`, `5m`), even if the stream is idle.
    #[serde(default = "default_roll_age")]
    pub max_age: String,
    /// A column whose value picks a subdirectory `<column>=<value>` (Hive style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
    /// Column compression.
    #[serde(default)]
    pub compression: ParquetCompression,
}

fn default_roll_rows() -> u64 {
    1_000_000
}

fn default_roll_bytes() -> u64 {
    128 * 1024 * 1024
}

fn default_roll_age() -> String {
    "60s".to_string()
}

/// A file sink.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// The output file. Parent directories are created.
    pub path: PathBuf,
}

/// A Parquet file sink.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetSink {
    /// The output file. Parent directories are created.
    pub path: PathBuf,
    /// Column compression.
    #[serde(default)]
    pub compression: ParquetCompression,
}

/// Parquet compression codecs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ParquetCompression {
    None,
    Snappy,
    #[default]
    Zstd,
}

impl ParquetCompression {
    /// The writer properties for this codec.
    pub fn writer_properties(self) -> datafusion::parquet::file::properties::WriterProperties {
        use datafusion::parquet::basic::{Compression, ZstdLevel};
        let codec = match self {
            ParquetCompression::None => Compression::UNCOMPRESSED,
            ParquetCompression::Snappy => Compression::SNAPPY,
            ParquetCompression::Zstd => Compression::ZSTD(ZstdLevel::default()),
        };
        datafusion::parquet::file::properties::WriterProperties::builder()
            .set_compression(codec)
            .build()
    }
}

/// `path` joined to `base` when relative, with `.` and `name/..` taken out (lexically, as the
/// path is written: `pipelines/../data/x.parquet` is `data/x.parquet`).
fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let mut out = PathBuf::new();
    for part in base.join(path).components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::ParentDir if out.has_root() && out.parent().is_none() => {}
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_pipeline_directory() {
        let r = |b: &str, p: &str| resolve(Path::new(b), Path::new(p));
        assert_eq!(
            r("pipelines", "../data/x.parquet"),
            Path::new("data/x.parquet")
        );
        assert_eq!(
            r("pipelines", "out/y.parquet"),
            Path::new("pipelines/out/y.parquet")
        );
        assert_eq!(r("", "data/*.jpg"), Path::new("data/*.jpg"));
        assert_eq!(r("/srv/p", "../../../x"), Path::new("/x"));
        assert_eq!(r("a", "../../x"), Path::new("../x"));
        assert_eq!(r("a", "/abs/x"), Path::new("/abs/x"));
        assert_eq!(r("a", ".."), Path::new("."));
        assert_eq!(r("/p", "./x/./y"), Path::new("/p/x/y"));
    }
}
