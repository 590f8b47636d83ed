//! Sources: registering a pipeline's input as a DataFusion table.
//!
//! Every source becomes a table named by the caller, so that the plan built on it is the same for
//! a bounded file and an unbounded stream.

pub mod files;
pub mod kafka;

use std::path::Path;

use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};

use crate::spec::Source;

fn has_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// The extension DataFusion should filter on: the file's own for a single file (so that
/// `data.pq` works), else the format's usual one.
fn extension(path: &str, default: &'static str) -> String {
    let p = Path::new(path);
    if p.is_file() {
        return p
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
    }
    default.to_string()
}

/// Checks that a path (not a glob) exists, so the user hears about a typo before anything runs.
fn check_exists(path: &str) -> Result<()> {
    if !has_glob(path) && !Path::new(path).exists() {
        return plan_err!("no such file or directory: {path}");
    }
    Ok(())
}

/// Registers `source` as the table `name`.
pub async fn register(ctx: &SessionContext, name: &str, source: &Source) -> Result<()> {
    match source {
        Source::Parquet(f) => {
            check_exists(&f.path)?;
            let ext = extension(&f.path, ".parquet");
            ctx.register_parquet(
                name,
                &f.path,
                ParquetReadOptions::default().file_extension(&ext),
            )
            .await
        }
        Source::Ipc(f) => {
            check_exists(&f.path)?;
            let ext = extension(&f.path, ".arrow");
            let options = ArrowReadOptions {
                file_extension: &ext,
                ..Default::default()
            };
            ctx.register_arrow(name, &f.path, options).await
        }
        Source::Csv(c) => {
            check_exists(&c.path)?;
            if !c.delimiter.is_ascii() {
                return plan_err!(
                    "delimiter must be one ASCII character, got {:?}",
                    c.delimiter
                );
            }
            let ext = extension(&c.path, ".csv");
            let options = CsvReadOptions::new()
                .has_header(c.has_header)
                .delimiter(c.delimiter as u8)
                .file_extension(&ext);
            ctx.register_csv(name, &c.path, options).await
        }
        Source::Kafka(k) => {
            let decoder = crate::source::kafka::Decoder::new(k).map_err(DataFusionError::Plan)?;
            ctx.register_table(
                name,
                std::sync::Arc::new(crate::stream::table::MicroBatchTable::new(decoder.schema())),
            )?;
            Ok(())
        }
        Source::Files(f) => {
            let table = files::FilesTable::list(&f.path, &f.allow_roots)?;
            ctx.register_table(name, std::sync::Arc::new(table))?;
            Ok(())
        }
        Source::Jsonl(f) => {
            check_exists(&f.path)?;
            let ext = extension(&f.path, ".jsonl");
            ctx.register_json(
                name,
                &f.path,
                JsonReadOptions::default().file_extension(&ext),
            )
            .await
        }
    }
}

/// Rows the source holds, when that is cheap to know (Parquet footers, listed files), for
/// progress and ETA.
pub async fn row_count(ctx: &SessionContext, name: &str, source: &Source) -> Option<u64> {
    if !matches!(source, Source::Parquet(_) | Source::Files(_)) {
        return None;
    }
    let batches = ctx
        .sql(&format!("SELECT count(*) FROM \"{name}\""))
        .await
        .ok()?
        .collect()
        .await
        .ok()?;
    let col = batches.first()?.column(0);
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    Some(col.as_primitive::<Int64Type>().value(0) as u64)
}

/// Registers a file by its extension (for `ferry query --table` and pipeline outputs).
pub async fn register_file(ctx: &SessionContext, name: &str, path: &str) -> Result<()> {
    let source = source_for_path(path)?;
    register(ctx, name, &source).await
}

/// The source kind for a file path, chosen by extension.
pub fn source_for_path(path: &str) -> Result<Source> {
    use crate::spec::{CsvSource, FileSource};
    let ext = Path::new(path.trim_end_matches('/'))
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let file = FileSource {
        path: path.to_string(),
    };
    Ok(match ext.as_str() {
        "parquet" | "pq" | "" => Source::Parquet(file),
        "arrow" | "ipc" | "feather" => Source::Ipc(file),
        "csv" => Source::Csv(CsvSource {
            path: path.to_string(),
            delimiter: ',',
            has_header: true,
        }),
        "jsonl" | "ndjson" | "json" => Source::Jsonl(file),
        other => {
            return Err(DataFusionError::Plan(format!(
                "{path}: cannot tell the format from the extension '.{other}' (use .parquet, .arrow, .csv or .jsonl)"
            )));
        }
    })
}
