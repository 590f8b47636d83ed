//! The pipeline file: what a user writes. Every field's doc comment is its user documentation and
//! ends up in `schemas/pipeline.schema.json`.

mod load;
pub mod locate;

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{Diagnostic, Diagnostics, LoadedPipeline, deserialize_at, load_pipeline};

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
    #[serde(with = "serde_yaml::with::singleton_map")]
    #[schemars(with = "Source")]
    pub source: Source,
    /// Transformations applied in order. Each step sees the previous step's result as the table
    /// `input`.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Where the enriched rows go.
    #[serde(with = "serde_yaml::with::singleton_map")]
    #[schemars(with = "Sink")]
    pub sink: Sink,
}

/// A bounded source: files read as one table. Paths are relative to the current directory.
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
}

impl Source {
    /// The key the source is written under (`parquet`, `csv`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Parquet(_) => "parquet",
            Source::Ipc(_) => "ipc",
            Source::Csv(_) => "csv",
            Source::Jsonl(_) => "jsonl",
        }
    }
}

/// Files of one format.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// A file, a directory (every file in it with the format's extension) or a glob such as
    /// `data/*.parquet`.
    pub path: String,
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
}

impl Sink {
    pub fn path(&self) -> &PathBuf {
        match self {
            Sink::Parquet(s) => &s.path,
            Sink::Ipc(s) | Sink::Jsonl(s) | Sink::Csv(s) => &s.path,
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Sink::Parquet(_) => "parquet",
            Sink::Ipc(_) => "ipc",
            Sink::Jsonl(_) => "jsonl",
            Sink::Csv(_) => "csv",
        }
    }
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
