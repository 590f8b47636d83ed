//! Sinks: writing result batches to a file that appears under its final name only when complete
//! (here), to Kafka ([`kafka`]) and to rolled Parquet files ([`rolling`]).

pub mod kafka;
pub mod rolling;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::csv;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::parquet::arrow::ArrowWriter;

use crate::spec::{ParquetCompression, Sink};

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
