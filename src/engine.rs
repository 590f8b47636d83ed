//! Planning and running a pipeline: source table → SQL and operator steps → sink.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::{Column, DataFusionError, ExprSchema};
use datafusion::dataframe::DataFrame;
use datafusion::execution::config::SessionConfig;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::error::df_message;
use crate::ops::{self, Operator, OperatorSet};
use crate::sink::{Settle, check_schema};
use crate::source;
use crate::spec::{Diagnostic, Diagnostics, LoadedPipeline, Pipeline, Step};

/// Rows per DataFusion batch. Operators sort each batch by token length before chunking it to
/// their own batch size, so this is also the window within which padding is minimised.
pub const BATCH_ROWS: usize = 8192;

/// A session context with ferry's settings and plain functions registered.
pub fn session_context() -> SessionContext {
    session_context_for(std::iter::empty())
}

/// Rows per batch of a plan calling operators of these tasks: [`BATCH_ROWS`], or fewer where a
/// task holds large inputs (images).
pub fn batch_rows(tasks: impl IntoIterator<Item = ops::TaskKind>) -> usize {
    tasks
        .into_iter()
        .filter_map(|t| t.info().batch_rows)
        .fold(BATCH_ROWS, usize::min)
}

/// A session context for a plan that calls operators of these tasks (see [`batch_rows`]).
pub fn session_context_for(tasks: impl IntoIterator<Item = ops::TaskKind>) -> SessionContext {
    session_context_with(SessionConfig::new().with_batch_size(batch_rows(tasks)))
}

/// A session context with ferry's settings and plain functions, and `config`.
pub fn session_context_with(config: SessionConfig) -> SessionContext {
    let ctx = SessionContext::new_with_state(session_state(config));
    register_functions(&ctx);
    ctx
}

/// ferry's session state with `config`: the information schema, DataFusion's default features
/// and ferry's rules ([`with_rules`]). A cluster's client context is made from it too.
pub fn session_state(config: SessionConfig) -> SessionState {
    let config = config.with_information_schema(true);
    with_rules(
        SessionStateBuilder::new()
            .with_config(config)
            .with_default_features(),
    )
    .build()
}

/// ferry's planning rules on a session state: equal operator calls run once. Also what a
/// cluster's scheduler plans with.
pub fn with_rules(builder: SessionStateBuilder) -> SessionStateBuilder {
    builder.with_physical_optimizer_rule(Arc::new(ops::distinct_calls::DistinctCalls))
}

/// ferry's plain functions: `cosine_similarity` and the `files` table function.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(ops::similarity::cosine_similarity());
    ctx.register_udtf("files", Arc::new(source::files::FilesFunction));
}

/// A planned pipeline, ready to run.
pub struct Planned {
    pub ctx: SessionContext,
    pub frame: DataFrame,
    pub total_rows: Option<u64>,
}

fn diag_of(p: &LoadedPipeline, path: &str, e: impl std::fmt::Display) -> Diagnostic {
    p.diagnostic(path, e.to_string())
}

/// Plans `p`: registers the source, applies each step and checks the sink. Every problem is
/// reported with its line; steps after a failed one are still checked where possible.
pub async fn plan(p: &LoadedPipeline, operators: &mut OperatorSet) -> Result<Planned, Diagnostics> {
    let ctx = pipeline_context(&p.pipeline, operators);
    plan_in(p, operators, ctx).await
}

/// [`plan`] in a given session context (a cluster's, [`crate::cluster`]).
pub async fn plan_in(
    p: &LoadedPipeline,
    operators: &mut OperatorSet,
    ctx: SessionContext,
) -> Result<Planned, Diagnostics> {
    let spec = &p.pipeline;
    operators.will_use(spec.steps.iter().filter_map(|s| s.operator.as_deref()));
    let mut problems = Vec::new();
    if let Err(e) = source::register(&ctx, "source", &spec.source).await {
        let at = match &spec.source {
            crate::spec::Source::Kafka(_) => "source.kafka".to_string(),
            other => format!("source.{}.path", other.kind()),
        };
        problems.push(diag_of(p, &at, df_message(&e)));
        // Steps cannot be checked without the source's columns; still check their operators.
        problems.extend(check_operators(p, operators, 0));
        return Err(Diagnostics(problems));
    }
    let total_rows = source::row_count(&ctx, "source", &spec.source).await;
    let mut frame = match ctx.table("source").await {
        Ok(f) => f,
        Err(e) => return Err(Diagnostics(vec![diag_of(p, "source", df_message(&e))])),
    };
    for (i, step) in spec.steps.iter().enumerate() {
        let at = format!("steps[{i}]");
        let op = match &step.operator {
            Some(name) => match operators.get(name) {
                Ok(op) => Some(op),
                Err(e) => {
                    problems.push(diag_of(p, &format!("{at}.operator"), e));
                    problems.extend(check_operators(p, operators, i + 1));
                    return Err(Diagnostics(problems));
                }
            },
            None => None,
        };
        match apply_step(&ctx, frame.clone(), step, op, spec.is_stream()).await {
            Ok(f) => frame = f,
            Err((key, message)) => {
                problems.push(diag_of(p, &format!("{at}.{key}"), message));
                problems.extend(check_operators(p, operators, i + 1));
                return Err(Diagnostics(problems));
            }
        }
    }
    let schema = frame.schema().as_arrow().clone();
    if let Err(e) = check_schema(&spec.sink, &schema) {
        problems.push(diag_of(
            p,
            &format!("sink.{}", spec.sink.format()),
            df_message(&e),
        ));
    }
    for (at, message) in crate::stream::check(spec, &schema) {
        problems.push(diag_of(p, &at, message));
    }
    if !problems.is_empty() {
        return Err(Diagnostics(problems));
    }
    Ok(Planned {
        ctx,
        frame,
        total_rows,
    })
}

/// A session context for `spec`'s plan (see [`session_context_for`]).
pub fn pipeline_context(spec: &Pipeline, operators: &OperatorSet) -> SessionContext {
    session_context_for(pipeline_tasks(spec, operators))
}

/// The tasks of the operators `spec`'s steps call.
pub fn pipeline_tasks<'a>(
    spec: &'a Pipeline,
    operators: &'a OperatorSet,
) -> impl Iterator<Item = ops::TaskKind> + 'a {
    spec.steps.iter().filter_map(|s| {
        let name = s.operator.as_ref()?;
        let m = operators
            .manifests()
            .iter()
            .find(|m| &m.manifest.name == name)?;
        Some(m.manifest.task)
    })
}

/// Applies one step to `frame`. An error says which of the step's keys it is about.
async fn apply_step(
    ctx: &SessionContext,
    frame: DataFrame,
    step: &Step,
    op: Option<&Operator>,
    stream: bool,
) -> Result<DataFrame, (&'static str, String)> {
    if let Some(sql) = &step.sql {
        return sql_step(ctx, frame, sql)
            .await
            .map_err(|e| ("sql", df_message(&e)));
    }
    let Some(op) = op else {
        return Ok(frame);
    };
    let output = step.output.as_deref().unwrap_or(&op.name);
    let frame =
        operator_step(frame, op, &step.inputs, output, stream).map_err(|e| ("inputs", e))?;
    if step.lineage {
        lineage_columns(frame, op, output).map_err(|e| ("lineage", e))
    } else {
        Ok(frame)
    }
}

/// Applies `spec`'s steps to `frame`, with operators [`plan`] built already (for a plan over a
/// part of the source, [`crate::job`]).
pub(crate) async fn apply_steps(
    ctx: &SessionContext,
    mut frame: DataFrame,
    spec: &Pipeline,
    operators: &OperatorSet,
) -> Result<DataFrame, DataFusionError> {
    for (i, step) in spec.steps.iter().enumerate() {
        let op = match &step.operator {
            Some(name) => Some(operators.built_get(name).ok_or_else(|| {
                DataFusionError::Plan(format!("steps[{i}]: operator '{name}' is not loaded"))
            })?),
            None => None,
        };
        frame = apply_step(ctx, frame, step, op, spec.is_stream())
            .await
            .map_err(|(key, message)| {
                DataFusionError::Plan(format!("steps[{i}].{key}: {message}"))
            })?;
    }
    Ok(frame)
}

/// Checks that the operators of steps `from..` exist and load, for when planning stopped early.
fn check_operators(
    p: &LoadedPipeline,
    operators: &mut OperatorSet,
    from: usize,
) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    for (i, step) in p.pipeline.steps.iter().enumerate().skip(from) {
        if let Some(name) = &step.operator
            && let Err(e) = operators.get(name)
        {
            problems.push(diag_of(p, &format!("steps[{i}].operator"), e));
        }
    }
    problems
}

async fn sql_step(
    ctx: &SessionContext,
    input: DataFrame,
    sql: &str,
) -> datafusion::common::Result<DataFrame> {
    ctx.deregister_table("input")?;
    ctx.register_table("input", input.into_view())?;
    let out = ctx.sql(sql).await;
    ctx.deregister_table("input")?;
    out
}

fn operator_step(
    frame: DataFrame,
    op: &Operator,
    inputs: &[String],
    output: &str,
    stream: bool,
) -> Result<DataFrame, String> {
    let schema = frame.schema();
    let mut args = Vec::new();
    let mut types = Vec::new();
    for name in inputs {
        let column = Column::from_name(name);
        let field = schema.field_from_column(&column).map_err(|_| {
            let have: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
            format!("no column '{name}' (columns: {})", have.join(", "))
        })?;
        types.push(field.data_type().clone());
        args.push(Expr::Column(column));
    }
    op.check_inputs(inputs, &types)?;
    // A stream passes each row's source record, so a row the operator cannot process can be
    // dead-lettered (when a SQL step dropped the lineage columns, it cannot).
    if stream {
        use crate::source::kafka::{OFFSET, PARTITION, TOPIC};
        let lineage = [TOPIC, PARTITION, OFFSET].map(Column::from_name);
        if lineage.iter().all(|c| schema.field_from_column(c).is_ok()) {
            args.extend(lineage.into_iter().map(Expr::Column));
        } else {
            tracing::warn!(operator = %op.name, "a SQL step dropped the lineage columns (_topic, _partition, _offset): rows this operator cannot process will be null instead of dead-lettered");
        }
    }
    let call = op.udf.call(args);
    let frame = frame
        .with_column(output, call)
        .map_err(|e| df_message(&e))?;
    // Resolve types now, so that a wrong column type is a plan error with this step's line.
    frame
        .logical_plan()
        .schema()
        .field_with_unqualified_name(output)
        .map_err(|e| df_message(&e))?;
    Ok(frame)
}

/// A step's lineage columns: `<output>_operator` and `<output>_model` (the model's hash).
fn lineage_columns(frame: DataFrame, op: &Operator, output: &str) -> Result<DataFrame, String> {
    use datafusion::prelude::lit;
    let hash = op.model_hash()?;
    frame
        .with_column(&format!("{output}_operator"), lit(op.name.clone()))
        .and_then(|f| f.with_column(&format!("{output}_model"), lit(hash)))
        .map_err(|e| df_message(&e))
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rows: u64,
    pub elapsed: Duration,
    /// Rows an operator could not process (output null, warning logged).
    pub row_errors: u64,
    /// For a job run in parts ([`crate::job`]): how many parts there were, and how many an
    /// earlier, unfinished run had done.
    pub resumed: Option<crate::job::Resumed>,
    /// Per operator, the inputs its model ran on (fewer than its rows where rows repeated, or
    /// where an inference cache or an earlier run's parts had them).
    pub model_inputs: Vec<(String, u64)>,
}

/// The operators' counters at the start of a run, to report what the run added.
pub(crate) struct Counters {
    row_errors: u64,
    model_inputs: BTreeMap<String, u64>,
}

impl Counters {
    pub(crate) fn start(operators: &OperatorSet) -> Self {
        Counters {
            row_errors: operators.built().map(|o| o.row_errors()).sum(),
            model_inputs: operators
                .built()
                .map(|o| (o.name.clone(), o.model_rows()))
                .collect(),
        }
    }

    /// The summary of a run that began with `self`.
    pub(crate) fn summary(
        &self,
        operators: &OperatorSet,
        rows: u64,
        elapsed: Duration,
        resumed: Option<crate::job::Resumed>,
    ) -> RunSummary {
        let row_errors = operators.built().map(|o| o.row_errors()).sum::<u64>() - self.row_errors;
        let mut model_inputs: Vec<(String, u64)> = operators
            .built()
            .map(|o| {
                let before = self.model_inputs.get(&o.name).copied().unwrap_or(0);
                (o.name.clone(), o.model_rows() - before)
            })
            .collect();
        model_inputs.sort();
        RunSummary {
            rows,
            elapsed,
            row_errors,
            resumed,
            model_inputs,
        }
    }
}

impl RunSummary {
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs a planned batch pipeline: as a resumable job of parts where it can be one
/// ([`crate::job`]; `restart` discards an unfinished earlier run's parts), else in one go.
pub async fn run_batch(
    loaded: &LoadedPipeline,
    planned: Planned,
    operators: &OperatorSet,
    quiet: bool,
    restart: bool,
) -> Result<RunSummary, DataFusionError> {
    let Some(job) = crate::job::prepare(loaded, &planned, operators, restart).await? else {
        return execute(planned, &loaded.pipeline.sink, operators, quiet).await;
    };
    let (bar, _ticker) = progress(planned.total_rows, quiet, operators);
    let summary = crate::job::run(job, loaded, planned, operators, bar.clone()).await?;
    bar.finish_and_clear();
    Ok(summary)
}

/// Executes a planned pipeline into its sink, showing progress unless `quiet`.
pub async fn execute(
    planned: Planned,
    sink: &crate::spec::Sink,
    operators: &OperatorSet,
    quiet: bool,
) -> Result<RunSummary, DataFusionError> {
    let start = Instant::now();
    let counters = Counters::start(operators);
    let schema = Arc::new(planned.frame.schema().as_arrow().clone());
    let mut stream = planned.frame.execute_stream().await?;
    // A file, or (a bounded source into a stream's sink) a Kafka topic or rolled files.
    let mut writer = crate::sink::open(sink, schema, Default::default()).map_err(sink_error)?;
    let (bar, _ticker) = progress(planned.total_rows, quiet, operators);
    let mut written = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        writer
            .write(std::slice::from_ref(&batch), Default::default())
            .map_err(sink_error)?;
        // Bounds what a Kafka sink has unacknowledged; nothing to commit for a bounded source.
        writer.durable(Settle::AfterWrite).map_err(sink_error)?;
        written += batch.num_rows() as u64;
        bar.set_position(bar.position().max(written));
    }
    writer.finish().map_err(sink_error)?;
    bar.finish_and_clear();
    Ok(counters.summary(operators, written, start.elapsed(), None))
}

/// A progress bar over `total` rows, and the task that advances it with the operators' progress
/// (they work a whole batch, 8192 rows, at a time) until it is dropped.
fn progress(
    total: Option<u64>,
    quiet: bool,
    operators: &OperatorSet,
) -> (indicatif::ProgressBar, AbortOnDrop) {
    let bar = progress_bar(total, quiet);
    let ticker = AbortOnDrop({
        let bar = bar.clone();
        let ops: Vec<Operator> = operators.built().cloned().collect();
        let before: Vec<u64> = ops.iter().map(Operator::progress_rows).collect();
        tokio::spawn(async move {
            if ops.is_empty() {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done: u64 = ops
                    .iter()
                    .zip(&before)
                    .map(|(o, b)| o.progress_rows() - b)
                    .sum();
                let inferred = done / ops.len() as u64;
                if inferred > bar.position() {
                    bar.set_position(inferred);
                }
            }
        })
    });
    (bar, ticker)
}

fn sink_error(e: String) -> DataFusionError {
    DataFusionError::Execution(e)
}

/// Stops a background task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.0} rows/s", state.per_sec());
}

fn progress_bar(total: Option<u64>, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:30} {human_pos}/{human_len} rows  {rate}  ETA {eta}",
            )
            .expect("valid template")
            .with_key("rate", rate),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {human_pos} rows  {rate}")
                .expect("valid template")
                .with_key("rate", rate),
        ),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Loads, plans and runs the pipeline in `file` with the manifests in `operators_dir`.
pub async fn run_file(
    file: &Path,
    operators_dir: &Path,
    quiet: bool,
) -> anyhow::Result<RunSummary> {
    let loaded = crate::spec::load_pipeline(file)?;
    let mut operators = load_operator_set(operators_dir, &loaded)?;
    let planned = plan(&loaded, &mut operators).await?;
    let summary = run_batch(&loaded, planned, &operators, quiet, false).await?;
    Ok(summary)
}

/// How a `ferry run` ended.
pub enum Finished {
    Batch(RunSummary),
    Stream(crate::stream::StreamSummary),
}

/// Loads, plans and runs a pipeline, bounded or streaming. A stream runs until SIGINT/SIGTERM
/// (then drains, flushes and commits) or the bounds in `options`.
pub async fn run_any(
    file: &Path,
    operators_dir: &Path,
    options: crate::stream::StreamOptions,
    restart: bool,
) -> anyhow::Result<Finished> {
    let loaded = crate::spec::load_pipeline(file)?;
    let mut operators = load_operator_set(operators_dir, &loaded)?;
    let planned = plan(&loaded, &mut operators).await?;
    if !loaded.pipeline.is_stream() {
        let summary = run_batch(&loaded, planned, &operators, options.quiet, restart).await?;
        return Ok(Finished::Batch(summary));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _signals = AbortOnDrop(tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: draining in-flight records, flushing, committing");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }));
    let handle = tokio::runtime::Handle::current();
    let pipeline = loaded.pipeline.clone();
    let summary = tokio::task::spawn_blocking(move || {
        crate::stream::run(&pipeline, planned.frame, &operators, &options, handle, stop)
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(Finished::Stream(summary))
}

/// Manifests for a pipeline. A missing operators directory is only an error when a step needs it.
pub fn load_operator_set(dir: &Path, p: &LoadedPipeline) -> Result<OperatorSet, Diagnostics> {
    let needs = p.pipeline.steps.iter().any(|s| s.operator.is_some());
    if !needs && !dir.is_dir() {
        return Ok(OperatorSet::default());
    }
    Ok(OperatorSet::new(ops::load_manifests(dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::TaskKind;

    #[test]
    fn plans_with_image_tasks_hold_fewer_rows_per_batch() {
        assert_eq!(batch_rows([]), BATCH_ROWS);
        assert_eq!(batch_rows([TaskKind::Embed, TaskKind::Answer]), BATCH_ROWS);
        assert_eq!(batch_rows([TaskKind::Embed, TaskKind::Detect]), 64);
        let ctx = session_context_for([TaskKind::ClassifyImage]);
        assert_eq!(ctx.state().config().batch_size(), 64);
    }
}
