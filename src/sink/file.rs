//! The file sink: Parquet, Arrow IPC, JSON Lines or CSV, written under a temporary name and
//! renamed into place only when complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::csv;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::parquet::arrow::ArrowWriter;

use super::{Covers, Offsets, Output, Settle, check_schema, plain_schema, sync_dir, to_plain};
use crate::error::df_message;
use crate::spec::{ParquetCompression, Sink};

enum Writer {
    Parquet(ArrowWriter<File>),
    Ipc(FileWriter<File>),
    Jsonl(LineDelimitedWriter<File>),
    Csv(csv::Writer<File>),
}

/// An open sink. Dropping it without [`SinkWriter::finish`] removes the partial file.
pub struct SinkWriter {
    writer: Option<Writer>,
    /// What the file holds ([`plain_schema`] of the plan's).
    schema: SchemaRef,
    tmp: PathBuf,
    path: PathBuf,
    rows: u64,
}

fn io_err(path: &Path, e: std::io::Error) -> DataFusionError {
    DataFusionError::Execution(format!("{}: {e}", path.display()))
}

impl SinkWriter {
    pub fn open(sink: &Sink, schema: SchemaRef) -> Result<Self> {
        check_schema(sink, &schema)?;
        let schema = plain_schema(&schema);
        let path = sink
            .path()
            .ok_or_else(|| {
                DataFusionError::Plan(format!("sink {} takes a stream, not a file", sink.format()))
            })?
            .clone();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let name = path
            .file_name()
            .ok_or_else(|| {
                DataFusionError::Plan(format!("sink path {} has no file name", path.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(".{name}.inprogress-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let writer = match sink {
            Sink::Parquet(p) => Writer::Parquet(ArrowWriter::try_new(
                file,
                Arc::clone(&schema),
                Some(p.compression.writer_properties()),
            )?),
            Sink::Ipc(_) => Writer::Ipc(FileWriter::try_new(file, &schema)?),
            Sink::Jsonl(_) => Writer::Jsonl(LineDelimitedWriter::new(file)),
            Sink::Csv(_) => Writer::Csv(csv::WriterBuilder::new().with_header(true).build(file)),
            Sink::Kafka(_) | Sink::RollingParquet(_) => {
                unreachable!("streaming sinks have no path")
            }
        };
        Ok(SinkWriter {
            writer: Some(writer),
            schema,
            tmp,
            path,
            rows: 0,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let batch = &to_plain(batch, &self.schema)?;
        match self.writer.as_mut().expect("write after finish") {
            Writer::Parquet(w) => w.write(batch)?,
            Writer::Ipc(w) => w.write(batch)?,
            Writer::Jsonl(w) => w.write(batch)?,
            Writer::Csv(w) => w.write(batch)?,
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Completes the file, syncs it and renames it into place. Returns the rows written.
    pub fn finish(mut self) -> Result<u64> {
        let file = match self.writer.take().expect("finish twice") {
            Writer::Parquet(w) => w.into_inner()?,
            Writer::Ipc(mut w) => {
                w.finish()?;
                w.into_inner()?
            }
            Writer::Jsonl(mut w) => {
                w.finish()?;
                w.into_inner()
            }
            Writer::Csv(w) => w.into_inner(),
        };
        file.sync_all().map_err(|e| io_err(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io_err(&self.path, e))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        sync_dir(dir).map_err(|e| io_err(dir, e))?;
        Ok(self.rows)
    }
}

impl Drop for SinkWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Output for SinkWriter {
    fn write(&mut self, batches: &[RecordBatch], _covers: Covers<'_>) -> Result<(), String> {
        batches
            .iter()
            .try_for_each(|b| SinkWriter::write(self, b))
            .map_err(|e| df_message(&e))
    }

    /// Nothing is durable before the file is complete (and a file source has no offsets).
    fn durable(&mut self, _settle: Settle) -> Result<Offsets, String> {
        Ok(Offsets::new())
    }

    fn finish(self: Box<Self>) -> Result<(), String> {
        SinkWriter::finish(*self)
            .map(|_rows| ())
            .map_err(|e| df_message(&e))
    }
}

/// A sink for a path, by its extension (for `ferry query --output`).
pub fn sink_for_path(path: &Path) -> Result<Sink> {
    use crate::spec::{FileSink, ParquetSink};
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let file = FileSink {
        path: path.to_path_buf(),
    };
    Ok(match ext.as_str() {
        "parquet" | "pq" => Sink::Parquet(ParquetSink {
            path: path.to_path_buf(),
            compression: ParquetCompression::default(),
        }),
        "arrow" | "ipc" | "feather" => Sink::Ipc(file),
        "jsonl" | "ndjson" | "json" => Sink::Jsonl(file),
        "csv" => Sink::Csv(file),
        other => {
            return plan_err!(
                "{}: cannot tell the output format from '.{other}' (use .parquet, .arrow, .jsonl or .csv)",
                path.display()
            );
        }
    })
}
