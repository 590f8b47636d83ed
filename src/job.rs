//! Resumable batch jobs.
//!
//! A batch pipeline that calls an operator, reads files and writes a file, and whose steps work
//! row by row (projections, filters, operator calls; no aggregate, sort, limit, join or window)
//! runs as a job of parts. The source is cut into units: ranges of rows of a Parquet file
//! ([`UNIT_BATCHES`] batches each), or whole files of the other formats. Each unit runs the
//! pipeline's steps by itself, and its rows go to a part file (Arrow IPC, written under a
//! temporary name, synced, renamed into place) in a job directory beside the sink's file:
//! `out/enriched.parquet` has `out/.enriched.parquet.job/`. When every part is there they are
//! copied, in unit order, into the sink's file (which appears complete or not at all) and the
//! job directory is removed.
//!
//! A job that dies (killed, out of memory, a failed write) leaves its finished parts behind. The
//! next `ferry run` of the pipeline finds them and checks that they were made by the same job:
//! the pipeline, the input files (paths, sizes, modification times), every operator's model
//! (content hash), task, options and provider, and ferry's version. If so it runs only the units
//! whose part is missing; otherwise (or with `ferry run --restart`) it starts over. Since parts
//! are concatenated in unit order, a resumed job writes the same file an uninterrupted one does.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{RecordBatch, new_null_array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::catalog::TableProvider;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::listing::ListingTable;
use datafusion::execution::TaskContext;
use datafusion::execution::config::SessionConfig;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
use datafusion::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::engine::{Planned, RunSummary};
use crate::ops::OperatorSet;
use crate::ops::cache::CacheIdentity;
use crate::sink::SinkWriter;
use crate::source::files::FilesTable;
use crate::spec::{FileSink, LoadedPipeline, Pipeline, Sink, Source};

/// Bumped when the job directory's layout changes, so that an older job is started over.
pub const FORMAT: u32 = 1;

/// Batches of rows per unit of a Parquet file: what a killed job may have to do again, per
/// unit in flight.
pub const UNIT_BATCHES: usize = 4;

/// A part of the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    /// The data file; empty for a `files` source.
    pub file: PathBuf,
    /// Parquet: rows `first..first + count` of the file; a `files` source: its files
    /// `first..first + count`. Other formats: the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<(u64, u64)>,
}

/// What units are read from.
enum Input {
    /// Data files, read by unit and given this schema (the source table's).
    Data(SchemaRef),
    /// The `files` source's table (a [`FilesTable`]), whose listing units slice.
    Files(Arc<dyn TableProvider>),
}

/// `job.json`: what the job is, and its units.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// BLAKE3 of `made_of`.
    identity: String,
    /// What the job depends on (for a person reading the file; the identity hashes it).
    made_of: serde_json::Value,
    units: Vec<Unit>,
}

/// A job ready to run: its directory (locked by this process) and which units are done.
pub struct Job {
    dir: PathBuf,
    units: Vec<Unit>,
    done: Vec<bool>,
    input: Input,
    /// Held for the job's life: a second `ferry run` of the same job refuses to start.
    _lock: File,
}

/// How a run resumed an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Parts an earlier run had finished.
    pub done: usize,
    pub parts: usize,
}

impl Job {
    fn part(&self, i: usize) -> PathBuf {
        part_path(&self.dir, i)
    }
}

fn part_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("part-{i:06}.arrow"))
}

/// The job directory for a sink file: `.NAME.job` beside it.
pub fn job_dir(sink: &Path) -> PathBuf {
    let name = sink.file_name().unwrap_or_default().to_string_lossy();
    sink.with_file_name(format!(".{name}.job"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataFusionError + '_ {
    move |e| DataFusionError::Execution(format!("{}: {e}", path.display()))
}

/// Why a pipeline cannot run as a job of independent parts, or `None` when it can.
pub fn not_resumable(spec: &Pipeline, plan: &LogicalPlan) -> Option<String> {
    if spec.sink.path().is_none() {
        return Some(format!("its sink ({}) is not a file", spec.sink.format()));
    }
    if !matches!(
        spec.source,
        Source::Parquet(_) | Source::Ipc(_) | Source::Csv(_) | Source::Jsonl(_) | Source::Files(_)
    ) {
        return Some(format!(
            "its source ({}) is not a set of files",
            spec.source.kind()
        ));
    }
    if !spec.steps.iter().any(|s| s.operator.is_some()) {
        return Some("it calls no operator".to_string());
    }
    row_by_row(plan).err()
}

/// Checks that every row of the plan's output comes from one source row, so the plan gives the
/// same rows run over parts of the source as over all of it.
fn row_by_row(plan: &LogicalPlan) -> std::result::Result<(), String> {
    let node = match plan {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Unnest(_)
        | LogicalPlan::TableScan(_) => None,
        other => Some(other.display().to_string()),
    };
    if let Some(node) = node {
        return Err(format!(
            "its steps combine rows ({node}); only projections, filters and operator calls run in parts"
        ));
    }
    let subquery = plan.expressions().iter().any(|e| {
        e.exists(|e| {
            Ok(matches!(
                e,
                Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
            ))
        })
        .unwrap_or(true)
    });
    if subquery {
        return Err("a step has a subquery".to_string());
    }
    plan.inputs().into_iter().try_for_each(row_by_row)
}

/// The job for `planned`, when it can run in parts (see [`not_resumable`]): an earlier unfinished
/// run of the same job is picked up unless `restart`.
pub async fn prepare(
    loaded: &LoadedPipeline,
    planned: &Planned,
    operators: &OperatorSet,
    restart: bool,
) -> Result<Option<Job>> {
    let spec = &loaded.pipeline;
    let plan = planned.frame.clone().into_optimized_plan()?;
    if let Some(why) = not_resumable(spec, &plan) {
        tracing::debug!(%why, "the run is not resumable");
        return Ok(None);
    }
    let sink = spec.sink.path().expect("checked").clone();
    let provider = planned.ctx.table_provider("source").await?;
    let unit_rows = (planned.ctx.state().config().batch_size() * UNIT_BATCHES) as u64;
    let (files, units, input) = if let Some(listing) = provider.downcast_ref::<ListingTable>() {
        let files = list_files(&planned.ctx, listing).await?;
        let units = cut(&spec.source, &files, unit_rows)?;
        (files, units, Input::Data(provider.schema()))
    } else if let Some(table) = provider.downcast_ref::<FilesTable>() {
        let files: Vec<Listed> = table
            .listing()
            .map(|(path, size, modified)| Listed {
                path: path.to_path_buf(),
                size,
                modified_ns: modified.unwrap_or(0).saturating_mul(1000),
            })
            .collect();
        let units = (0..table.len() as u64)
            .step_by(unit_rows as usize)
            .map(|first| Unit {
                file: PathBuf::new(),
                rows: Some((first, unit_rows.min(table.len() as u64 - first))),
            })
            .collect();
        (files, units, Input::Files(Arc::clone(&provider)))
    } else {
        return Ok(None);
    };
    let made_of = serde_json::json!({
        "format": FORMAT,
        "ferry": env!("CARGO_PKG_VERSION"),
        "pipeline": spec,
        "files": files.iter().map(|f| serde_json::json!({
            "path": f.path, "size": f.size, "modified_ns": f.modified_ns,
        })).collect::<Vec<_>>(),
        "operators": operator_identities(spec, operators)?,
        "unit_rows": unit_rows,
    });
    let identity = blake3::hash(made_of.to_string().as_bytes())
        .to_hex()
        .to_string();

    let dir = job_dir(&sink);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let lock_path = dir.join("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    if let Err(e) = lock.try_lock() {
        return Err(DataFusionError::Execution(format!(
            "{}: another ferry run is working on this job ({e}); wait for it, or stop it first",
            dir.display()
        )));
    }
    let manifest_path = dir.join("job.json");
    let earlier: Option<Manifest> = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let resume = match &earlier {
        Some(_) if restart => {
            tracing::info!(dir = %dir.display(), "--restart: discarding the unfinished job's parts");
            false
        }
        Some(m) if m.identity == identity && m.units == units => true,
        Some(_) => {
            tracing::warn!(dir = %dir.display(), "an unfinished job was for other inputs, steps or models: starting over");
            false
        }
        None => false,
    };
    // Whatever is not a finished part of this job goes: temporaries of a killed run, parts of
    // another job.
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let entry = entry.map_err(io(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = name == "lock" || (resume && (name == "job.json" || is_part_name(&name)));
        if !keep {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    if !resume {
        let manifest = Manifest {
            format: FORMAT,
            identity,
            made_of,
            units: units.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("serializable");
        crate::runtime::wheel::write_atomically(&manifest_path, &bytes)
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
    }
    let done = (0..units.len())
        .map(|i| resume && readable_part(&part_path(&dir, i)))
        .collect();
    Ok(Some(Job {
        dir,
        units,
        done,
        input,
        _lock: lock,
    }))
}

fn is_part_name(name: &str) -> bool {
    name.strip_prefix("part-")
        .and_then(|n| n.strip_suffix(".arrow"))
        .is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a part file opens (its footer is written last, so a part that opens is complete).
/// A part that does not is removed, to be written again.
fn readable_part(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    let ok = File::open(path)
        .ok()
        .and_then(|f| FileReader::try_new(f, None).ok())
        .is_some();
    if !ok {
        tracing::warn!(part = %path.display(), "an unreadable part is written again");
        let _ = std::fs::remove_file(path);
    }
    ok
}

/// What each operator the pipeline calls depends on: the inference cache's identity of it
/// (model hash, task, file, provider, options), wherever its model directory is.
fn operator_identities(spec: &Pipeline, operators: &OperatorSet) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for name in spec.steps.iter().filter_map(|s| s.operator.as_ref()) {
        let missing = || DataFusionError::Plan(format!("operator '{name}' is not loaded"));
        let op = operators.built_get(name).ok_or_else(missing)?;
        let m = operators
            .manifests()
            .iter()
            .find(|m| &m.manifest.name == name)
            .ok_or_else(missing)?;
        let hash = op.model_hash().map_err(DataFusionError::Execution)?;
        let identity = CacheIdentity::new(&m.manifest, &op.model.dir, hash).without_location();
        out.insert(
            name.clone(),
            serde_json::to_value(identity).expect("serializable"),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// An input file as listed.
#[derive(Debug, Clone)]
struct Listed {
    path: PathBuf,
    size: u64,
    modified_ns: i64,
}

/// The files the source table reads, in path order (as DataFusion lists them).
async fn list_files(ctx: &SessionContext, table: &ListingTable) -> Result<Vec<Listed>> {
    use datafusion::object_store::local::LocalFileSystem;
    let state = ctx.state();
    let local = LocalFileSystem::new();
    let mut out = Vec::new();
    for url in table.table_paths() {
        let store = ctx.runtime_env().object_store(url)?;
        let extension = &table.options().file_extension;
        let mut listed = url
            .list_all_files(&state, store.as_ref(), extension)
            .await?;
        while let Some(meta) = listed.try_next().await? {
            let path = local
                .path_to_filesystem(&meta.location)
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            out.push(Listed {
                path,
                size: meta.size,
                modified_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}

/// Cuts the files into units: Parquet files in ranges of `unit_rows` rows, others whole.
fn cut(source: &Source, files: &[Listed], unit_rows: u64) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for f in files {
        if !matches!(source, Source::Parquet(_)) {
            units.push(Unit {
                file: f.path.clone(),
                rows: None,
            });
            continue;
        }
        let file = File::open(&f.path).map_err(io(&f.path))?;
        let reader = datafusion::parquet::file::reader::SerializedFileReader::new(file)
            .map_err(|e| DataFusionError::Execution(format!("{}: {e}", f.path.display())))?;
        use datafusion::parquet::file::reader::FileReader as _;
        let n = reader.metadata().file_metadata().num_rows().max(0) as u64;
        let mut first = 0;
        while first < n {
            let count = unit_rows.min(n - first);
            units.push(Unit {
                file: f.path.clone(),
                rows: Some((first, count)),
            });
            first += count;
        }
    }
    Ok(units)
}

/// Runs the job's missing units, then writes the sink's file from the parts.
pub async fn run(
    job: Job,
    loaded: &LoadedPipeline,
    planned: Planned,
    operators: &OperatorSet,
    bar: indicatif::ProgressBar,
) -> Result<RunSummary> {
    let start = Instant::now();
    let spec = &loaded.pipeline;
    let counters = crate::engine::Counters::start(operators);
    let resumed = Resumed {
        done: job.done.iter().filter(|d| **d).count(),
        parts: job.units.len(),
    };
    if resumed.done > 0 {
        tracing::info!(
            dir = %job.dir.display(),
            done = resumed.done,
            parts = resumed.parts,
            "resuming an unfinished job"
        );
    }
    let batch_rows = planned.ctx.state().config().batch_size();
    let concurrency = planned.ctx.state().config().target_partitions().max(1);
    let plan_schema: SchemaRef = Arc::new(planned.frame.schema().as_arrow().clone());
    let job = &job;
    let todo: Vec<usize> = (0..job.units.len()).filter(|&i| !job.done[i]).collect();
    futures::stream::iter(todo)
        .map(|i| {
            let (plan_schema, bar) = (&plan_schema, &bar);
            async move {
                let rows = run_unit(job, i, spec, operators, batch_rows, plan_schema).await?;
                bar.inc(rows);
                Ok::<_, DataFusionError>(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;

    // Every part is there: copy them, in order, into the sink's file.
    let mut writer = SinkWriter::open(&spec.sink, plan_schema)?;
    for i in 0..job.units.len() {
        let path = job.part(i);
        let file = File::open(&path).map_err(io(&path))?;
        let reader = FileReader::try_new(file, None)
            .map_err(|e| DataFusionError::Execution(format!("{}: {e}", path.display())))?;
        for batch in reader {
            writer.write(&batch?)?;
        }
    }
    let written = writer.finish()?;
    std::fs::remove_dir_all(&job.dir).map_err(io(&job.dir))?;
    Ok(counters.summary(operators, written, start.elapsed(), Some(resumed)))
}

/// Runs the pipeline's steps over unit `i` into its part file (an Arrow IPC file written
/// through the file sink: under a temporary name, removed if the unit fails or is dropped,
/// synced and renamed into place when complete). Returns the rows written.
async fn run_unit(
    job: &Job,
    i: usize,
    spec: &Pipeline,
    operators: &OperatorSet,
    batch_rows: usize,
    plan_schema: &SchemaRef,
) -> Result<u64> {
    let unit = &job.units[i];
    // One partition, so the unit's rows keep their order.
    let config = SessionConfig::new()
        .with_batch_size(batch_rows)
        .with_target_partitions(1);
    let ctx = crate::engine::session_context_with(config);
    let table: Arc<dyn TableProvider> = match (&job.input, unit.rows) {
        (Input::Files(table), Some((first, count))) => {
            let files = table
                .downcast_ref::<FilesTable>()
                .ok_or_else(|| DataFusionError::Internal("a files unit of another table".into()))?;
            Arc::new(files.slice(first as usize, count as usize))
        }
        (Input::Data(schema), _) => {
            let partition = UnitPartition {
                unit: unit.clone(),
                source: spec.source.clone(),
                schema: Arc::clone(schema),
                batch_rows,
            };
            Arc::new(StreamingTable::try_new(
                Arc::clone(schema),
                vec![Arc::new(partition)],
            )?)
        }
        (Input::Files(_), None) => {
            return Err(DataFusionError::Internal(
                "a files unit without its range".into(),
            ));
        }
    };
    ctx.register_table("source", table)?;
    let frame = ctx.table("source").await?;
    let frame = crate::engine::apply_steps(&ctx, frame, spec, operators).await?;
    let mut stream = frame.execute_stream().await?;

    let part = Sink::Ipc(FileSink { path: job.part(i) });
    let mut writer = SinkWriter::open(&part, Arc::clone(plan_schema))?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| {
            DataFusionError::Execution(format!(
                "{}: {}",
                describe(unit),
                crate::error::df_message(&e)
            ))
        })?;
        writer.write(&batch)?;
    }
    writer.finish()
}

/// "FILE", "FILE rows A..B" or "files A..B", for messages.
fn describe(unit: &Unit) -> String {
    if unit.file.as_os_str().is_empty() {
        let (first, count) = unit.rows.unwrap_or_default();
        return format!("files {}..{}", first, first + count);
    }
    match unit.rows {
        Some((first, count)) => {
            format!("{} rows {}..{}", unit.file.display(), first, first + count)
        }
        None => unit.file.display().to_string(),
    }
}

/// One unit's rows, read in order and given the source table's schema.
#[derive(Debug)]
struct UnitPartition {
    unit: Unit,
    source: Source,
    schema: SchemaRef,
    batch_rows: usize,
}

impl PartitionStream for UnitPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (unit, source, schema, batch_rows) = (
            self.unit.clone(),
            self.source.clone(),
            Arc::clone(&self.schema),
            self.batch_rows,
        );
        let conform_to = Arc::clone(&schema);
        let batches = futures::stream::once(async move {
            read_unit(&unit, &source, batch_rows)
                .await
                .map_err(|e| DataFusionError::Execution(format!("{}: {e}", describe(&unit))))
        })
        .try_flatten()
        .and_then(move |b| std::future::ready(conform(&b, &conform_to)));
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }
}

type BatchStream = futures::stream::BoxStream<'static, Result<RecordBatch>>;

async fn read_unit(unit: &Unit, source: &Source, batch_rows: usize) -> Result<BatchStream> {
    if let Some((first, count)) = unit.rows {
        let file = tokio::fs::File::open(&unit.file)
            .await
            .map_err(io(&unit.file))?;
        let builder = ParquetRecordBatchStreamBuilder::new(file).await?;
        // The row groups the range touches, and the range within them.
        let (mut start, mut groups, mut covered, mut skip) = (0u64, Vec::new(), 0u64, None);
        for (g, rg) in builder.metadata().row_groups().iter().enumerate() {
            let n = rg.num_rows().max(0) as u64;
            if start + n > first && start < first + count {
                groups.push(g);
                skip.get_or_insert(first - start);
                covered += n;
            }
            start += n;
        }
        let skip = skip.unwrap_or(0);
        let selection = RowSelection::from(vec![
            RowSelector::skip(skip as usize),
            RowSelector::select(count as usize),
            RowSelector::skip(covered.saturating_sub(skip + count) as usize),
        ]);
        let stream = builder
            .with_row_groups(groups)
            .with_row_selection(selection)
            .with_batch_size(batch_rows)
            .build()?;
        return Ok(stream.map_err(DataFusionError::from).boxed());
    }
    // Another format: the file by itself, through DataFusion's reader for it.
    let ctx = SessionContext::new_with_config(
        SessionConfig::new()
            .with_batch_size(batch_rows)
            .with_target_partitions(1),
    );
    let path = unit.file.to_string_lossy().into_owned();
    let one = match source {
        Source::Ipc(_) => Source::Ipc(crate::spec::FileSource { path }),
        Source::Jsonl(_) => Source::Jsonl(crate::spec::FileSource { path }),
        Source::Csv(c) => Source::Csv(crate::spec::CsvSource { path, ..c.clone() }),
        other => {
            return Err(DataFusionError::Internal(format!(
                "a {} source has no whole-file units",
                other.kind()
            )));
        }
    };
    crate::source::register(&ctx, "unit", &one).await?;
    let stream = ctx.table("unit").await?.execute_stream().await?;
    Ok(stream.boxed())
}

/// `batch` with the columns of `schema`, cast where the file's types differ from the table's
/// (a file read by itself may infer narrower types), null where the file lacks a column.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
            Some(c) => datafusion::arrow::compute::cast(c, f.data_type()).map_err(|e| {
                DataFusionError::Execution(format!(
                    "column '{}' ({} in this file, {} in the table): {e}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                ))
            }),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_directory_is_hidden_beside_the_sink() {
        assert_eq!(
            job_dir(Path::new("out/enriched.parquet")),
            PathBuf::from("out/.enriched.parquet.job")
        );
        assert!(is_part_name("part-000012.arrow"));
        assert!(!is_part_name(".part-000012.arrow.inprogress-41"));
        assert!(!is_part_name("part-12.arrow"));
    }

    #[tokio::test]
    async fn only_row_by_row_steps_run_in_parts() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("text", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ],
        )
        .unwrap();
        ctx.register_batch("input", batch).unwrap();
        let check = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let plan = ctx.sql(sql).await.unwrap().into_optimized_plan().unwrap();
                row_by_row(&plan)
            }
        };
        for ok in [
            "SELECT id, upper(text) AS t FROM input WHERE id > 1",
            "SELECT * FROM (SELECT id + 1 AS n FROM input) x WHERE n < 5",
        ] {
            assert_eq!(check(ok).await, Ok(()), "{ok}");
        }
        for combines in [
            "SELECT count(*) FROM input",
            "SELECT DISTINCT text FROM input",
            "SELECT * FROM input ORDER BY id",
            "SELECT * FROM input LIMIT 1",
            "SELECT id, row_number() OVER (ORDER BY id) FROM input",
            "SELECT * FROM input WHERE id > (SELECT avg(id) FROM input)",
            "SELECT a.id FROM input a JOIN input b ON a.id = b.id",
        ] {
            assert!(check(combines).await.is_err(), "{combines}");
        }
    }
}
