//! The `files` source: a folder (or glob) of files as a table, one row per file:
//! `path, size, modified, bytes, error`.
//!
//! Files are listed at plan time (paths and metadata only). Their bytes are read while the
//! table is scanned, a small batch at a time (at most [`BATCH_FILES`] files and
//! [`BATCH_BYTES`] bytes), and only when the `bytes` column is used, so a folder larger than
//! memory streams through an image or audio operator with flat memory. A file that cannot be
//! read (gone since listing, unreadable, outside the allowed roots through a symbolic link)
//! keeps its row, with null `bytes` and the reason in `error`; the rest flows.
//!
//! In SQL the same table is the function `files('photos/**/*.jpg')`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableFunctionImpl};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::datasource::TableProvider;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::scalar::ScalarValue;

/// Files per batch.
pub const BATCH_FILES: usize = 64;
/// Bytes read per batch (a batch holds at least one file, however large).
pub const BATCH_BYTES: u64 = 64 << 20;

/// The columns, in order.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("size", DataType::UInt64, false),
        Field::new(
            "modified",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("bytes", DataType::Binary, true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

const BYTES_COLUMN: usize = 3;

/// A listed file.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    size: u64,
    modified: Option<i64>,
}

/// The directory a path or glob starts from: the components before the first one with a glob
/// character (the path itself for a directory, its parent for a file).
pub fn base_dir(pattern: &str) -> PathBuf {
    let mut base = PathBuf::new();
    for part in Path::new(pattern).components() {
        if part.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            return if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base
            };
        }
        base.push(part);
    }
    if base.is_dir() {
        base
    } else {
        base.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// The `files` table over `pattern`.
#[derive(Debug)]
pub struct FilesTable {
    entries: Arc<Vec<Entry>>,
    roots: Arc<Vec<PathBuf>>,
}

impl FilesTable {
    /// Lists the files `pattern` names: a file, every file under a directory, or a glob's
    /// matches (sorted by path). `allow_roots` (default: the pattern's base directory) bounds
    /// where the files may be, after symbolic links are resolved.
    pub fn list(pattern: &str, allow_roots: &[PathBuf]) -> Result<Self> {
        let roots = if allow_roots.is_empty() {
            vec![base_dir(pattern)]
        } else {
            allow_roots.to_vec()
        };
        let roots: Vec<PathBuf> = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| {
                    DataFusionError::Plan(format!("allow_roots: {}: {e}", r.display()))
                })
            })
            .collect::<Result<_>>()?;
        let p = Path::new(pattern);
        let mut paths: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
            glob::glob(pattern)
                .map_err(|e| DataFusionError::Plan(format!("{pattern}: {e}")))?
                .filter_map(|r| r.ok())
                .filter(|p| p.is_file())
                .collect()
        } else if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found).map_err(|e| DataFusionError::Plan(format!("{pattern}: {e}")))?;
            found
        } else if p.is_file() {
            vec![p.to_path_buf()]
        } else {
            return plan_err!("no such file or directory: {pattern}");
        };
        paths.sort();
        let entries = paths
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(&path).ok();
                Entry {
                    size: meta.as_ref().map_or(0, |m| m.len()),
                    modified: meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_micros() as i64),
                    path,
                }
            })
            .collect();
        Ok(FilesTable {
            entries: Arc::new(entries),
            roots: Arc::new(roots),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The table of files `first..first + count` of this one (for a job run in parts).
    pub fn slice(&self, first: usize, count: usize) -> FilesTable {
        let end = (first + count).min(self.entries.len());
        FilesTable {
            entries: Arc::new(self.entries[first.min(end)..end].to_vec()),
            roots: Arc::clone(&self.roots),
        }
    }

    /// Each listed file's path, size and modification time (microseconds since the epoch), in
    /// order: what a job over this table depends on.
    pub fn listing(&self) -> impl Iterator<Item = (&Path, u64, Option<i64>)> {
        self.entries
            .iter()
            .map(|e| (e.path.as_path(), e.size, e.modified))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[async_trait]
impl TableProvider for FilesTable {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let read_bytes = projection.is_none_or(|p| p.contains(&BYTES_COLUMN));
        let partition = FilesPartition {
            schema: schema(),
            entries: Arc::clone(&self.entries),
            roots: Arc::clone(&self.roots),
            read_bytes,
        };
        Ok(Arc::new(StreamingTableExec::try_new(
            schema(),
            vec![Arc::new(partition)],
            projection,
            vec![],
            false,
            limit,
        )?))
    }
}

/// The files, read batch by batch.
#[derive(Debug)]
struct FilesPartition {
    schema: SchemaRef,
    entries: Arc<Vec<Entry>>,
    roots: Arc<Vec<PathBuf>>,
    read_bytes: bool,
}

impl PartitionStream for FilesPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (entries, roots, read_bytes, schema) = (
            Arc::clone(&self.entries),
            Arc::clone(&self.roots),
            self.read_bytes,
            Arc::clone(&self.schema),
        );
        let batches = futures::stream::unfold(0usize, move |start| {
            let (entries, roots, schema) = (
                Arc::clone(&entries),
                Arc::clone(&roots),
                Arc::clone(&schema),
            );
            async move {
                if start >= entries.len() {
                    return None;
                }
                // The next batch: up to BATCH_FILES files and BATCH_BYTES bytes (at least one).
                let mut end = start;
                let mut bytes = 0u64;
                while end < entries.len()
                    && end - start < BATCH_FILES
                    && (end == start || !read_bytes || bytes + entries[end].size <= BATCH_BYTES)
                {
                    bytes += entries[end].size;
                    end += 1;
                }
                let batch = tokio::task::spawn_blocking(move || {
                    read_batch(&schema, &entries[start..end], &roots, read_bytes)
                })
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))
                .and_then(|r| r);
                Some((batch, end))
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            batches,
        ))
    }
}

/// Reads one file if it may be read: it must still resolve (symbolic links followed) to a
/// place under one of the roots.
fn read_file(path: &Path, roots: &[PathBuf]) -> Result<Vec<u8>, String> {
    let canonical = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    if !crate::ops::image::under_roots(&canonical, roots) {
        return Err(format!(
            "resolves to {}, outside the allowed roots ({}); add it to the source's allow_roots",
            canonical.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    std::fs::read(&canonical).map_err(|e| e.to_string())
}

fn read_batch(
    schema: &SchemaRef,
    entries: &[Entry],
    roots: &[PathBuf],
    read_bytes: bool,
) -> Result<RecordBatch> {
    let mut path = StringBuilder::new();
    let mut size = UInt64Builder::new();
    let mut modified = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut bytes = BinaryBuilder::new();
    let mut error = StringBuilder::new();
    for e in entries {
        path.append_value(e.path.to_string_lossy());
        size.append_value(e.size);
        modified.append_option(e.modified);
        if !read_bytes {
            bytes.append_null();
            error.append_null();
            continue;
        }
        match read_file(&e.path, roots) {
            Ok(data) => {
                bytes.append_value(&data);
                error.append_null();
            }
            Err(reason) => {
                tracing::warn!(path = %e.path.display(), %reason, "file cannot be read; its bytes are null");
                bytes.append_null();
                error.append_value(reason);
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(path.finish()),
        Arc::new(size.finish()),
        Arc::new(modified.finish()),
        Arc::new(bytes.finish()),
        Arc::new(error.finish()),
    ];
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// `files('glob' [, 'allowed root', ...])` in SQL.
#[derive(Debug, Default)]
pub struct FilesFunction;

impl TableFunctionImpl for FilesFunction {
    fn call_with_args(
        &self,
        args: datafusion::catalog::TableFunctionArgs,
    ) -> Result<Arc<dyn TableProvider>> {
        let mut strings = Vec::new();
        for e in args.exprs() {
            match e {
                Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)), _) => {
                    strings.push(s.clone())
                }
                other => {
                    return plan_err!(
                        "files() takes a path or glob and optionally allowed roots, as string literals; got {other}"
                    );
                }
            }
        }
        let Some((pattern, roots)) = strings.split_first() else {
            return plan_err!("files() needs a path or glob, e.g. files('photos/**/*.jpg')");
        };
        let roots: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
        Ok(Arc::new(FilesTable::list(pattern, &roots)?))
    }
}

#[cfg(test)]
mod tests {
    use super::base_dir;
    use std::path::PathBuf;

    #[test]
    fn base_dir_is_the_part_before_the_glob() {
        assert_eq!(base_dir("photos/**/*.jpg"), PathBuf::from("photos"));
        assert_eq!(base_dir("*.jpg"), PathBuf::from("."));
        assert_eq!(base_dir("/data/a/b?/c"), PathBuf::from("/data/a"));
    }
}
