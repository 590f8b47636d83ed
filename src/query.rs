//! `ferry query`: SQL over pipeline outputs and other files, with operators as functions.

use std::path::{Path, PathBuf};

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::execution::config::SessionConfig;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::engine::{batch_rows, session_context_with};
use crate::ops::OperatorSet;
use crate::sink::{SinkWriter, sink_for_path};
use crate::source;

/// What to make available to the query.
#[derive(Debug, Default, Clone)]
pub struct QueryInputs {
    /// `name=path` tables.
    pub tables: Vec<(String, String)>,
    /// Directory of pipeline files whose outputs become tables (named after the pipeline).
    pub pipelines_dir: Option<PathBuf>,
    /// Directory of operator manifests.
    pub operators_dir: Option<PathBuf>,
    /// Run queries on a Ballista cluster (`df://HOST:PORT`) instead of in this process.
    pub cluster: Option<String>,
}

/// The pipelines of a directory as tables: those registered, and those skipped with why.
#[derive(Debug, Default, Clone)]
pub struct PipelineTables {
    pub dir: PathBuf,
    pub registered: Vec<String>,
    /// (pipeline file, why its output is not a table).
    pub skipped: Vec<(PathBuf, String)>,
}

impl PipelineTables {
    /// What a user reads when a query names a table that is not there.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "tables from the pipelines in {}: {}",
            self.dir.display(),
            if self.registered.is_empty() {
                "none".to_string()
            } else {
                self.registered.join(", ")
            }
        );
        for (file, why) in &self.skipped {
            out.push_str(&format!("\n  skipped {}: {why}", file.display()));
        }
        out
    }
}

/// Registers the outputs of every pipeline in `dir` that has been run, as tables named after
/// the pipelines.
pub async fn register_pipeline_outputs(ctx: &SessionContext, dir: &Path) -> PipelineTables {
    let mut tables = PipelineTables {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tables
                .skipped
                .push((dir.to_path_buf(), format!("cannot read the directory: {e}")));
            return tables;
        }
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in files {
        if !matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let p = match crate::spec::load_pipeline(&file) {
            Ok(p) => p,
            Err(diags) => {
                let first = diags.to_string();
                let first = first.lines().next().unwrap_or_default().to_string();
                tables.skipped.push((
                    file.clone(),
                    format!("not a valid pipeline ({first}; `ferry validate` lists every problem)"),
                ));
                continue;
            }
        };
        let name = &p.pipeline.name;
        let (out, src) = match &p.pipeline.sink {
            crate::spec::Sink::RollingParquet(r) => (
                r.dir.clone(),
                Ok(crate::spec::Source::Parquet(crate::spec::FileSource {
                    path: r.dir.to_string_lossy().into_owned(),
                })),
            ),
            sink => match sink.path() {
                Some(out) => (out.clone(), source::source_for_path(&out.to_string_lossy())),
                None => {
                    tables.skipped.push((
                        file.clone(),
                        format!(
                            "pipeline '{name}' writes to {}, which is not a table to query",
                            sink.format()
                        ),
                    ));
                    continue;
                }
            },
        };
        if !out.exists() {
            tables.skipped.push((
                file.clone(),
                format!(
                    "pipeline '{name}' has no output yet ({} does not exist; `ferry run {}` makes it)",
                    out.display(),
                    file.display()
                ),
            ));
            continue;
        }
        let registered = match src {
            Ok(src) => source::register(ctx, name, &src).await,
            Err(e) => Err(e),
        };
        match registered {
            Ok(()) => tables.registered.push(name.clone()),
            Err(e) => tables.skipped.push((
                file.clone(),
                format!(
                    "pipeline '{name}': cannot read its output {}: {e}",
                    out.display()
                ),
            )),
        }
    }
    tables
}

/// Words in `sql` that could be function names; used to load only the operators a query calls.
fn mentioned(sql: &str, name: &str) -> bool {
    let lower = sql.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == name)
}

/// A query's context: its tables and operators, and the pipelines its tables came from.
pub struct QueryContext {
    pub ctx: SessionContext,
    pub operators: OperatorSet,
    pub pipelines: Option<PipelineTables>,
}

impl QueryContext {
    /// Registers the tables of `inputs`; no operator is loaded yet. `may_call`: the operators
    /// the queries may call (their tasks set how many rows a batch holds: images, few).
    pub async fn open(
        inputs: &QueryInputs,
        may_call: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Self> {
        let operators = match &inputs.operators_dir {
            Some(dir) if dir.is_dir() => OperatorSet::new(crate::ops::load_manifests(dir)?),
            _ => OperatorSet::default(),
        };
        let batch_rows = batch_rows(
            operators
                .manifests()
                .iter()
                .filter(|m| may_call(&m.manifest.name))
                .map(|m| m.manifest.task),
        );
        let ctx = match &inputs.cluster {
            Some(url) => crate::cluster::remote_context(url, "ferry query", batch_rows).await?,
            None => session_context_with(SessionConfig::new().with_batch_size(batch_rows)),
        };
        let pipelines = match &inputs.pipelines_dir {
            Some(dir) => Some(register_pipeline_outputs(&ctx, dir).await),
            None => None,
        };
        for (name, path) in &inputs.tables {
            source::register_file(&ctx, name, path)
                .await
                .map_err(|e| anyhow::anyhow!("--table {name}={path}: {e}"))?;
        }
        Ok(QueryContext {
            ctx,
            operators,
            pipelines,
        })
    }

    /// Registers the operators `sql` calls as functions; each model is loaded on its first
    /// call ([`OperatorSet::get`] keeps it), registering it again replaces it with itself.
    pub fn register_operators_for(&mut self, sql: &str) -> anyhow::Result<()> {
        let wanted: Vec<String> = self
            .operators
            .names()
            .into_iter()
            .filter(|n| mentioned(sql, n))
            .map(str::to_string)
            .collect();
        self.operators.will_use(wanted.iter().map(String::as_str));
        for name in wanted {
            let op = self.operators.get(&name).map_err(anyhow::Error::msg)?;
            self.ctx.register_udf(op.udf.clone());
        }
        Ok(())
    }

    /// Plans `sql`; a table that is not there is explained by the pipelines that were skipped.
    pub async fn sql(&self, sql: &str) -> anyhow::Result<datafusion::dataframe::DataFrame> {
        match self.ctx.sql(sql).await {
            Ok(frame) => Ok(frame),
            Err(e) => {
                let message = e.to_string();
                match &self.pipelines {
                    Some(p) if message.contains("table '") && message.contains("not found") => {
                        Err(anyhow::anyhow!("{message}\n{}", p.explain()))
                    }
                    _ => Err(e.into()),
                }
            }
        }
    }
}

/// Builds a context with tables and the operators `sql` mentions.
pub async fn context_for(sql: &str, inputs: &QueryInputs) -> anyhow::Result<QueryContext> {
    let mut query = QueryContext::open(inputs, |name| mentioned(sql, name)).await?;
    query.register_operators_for(sql)?;
    Ok(query)
}

/// Runs `sql`; prints a table, or writes `output` (format from its extension).
pub async fn run(sql: &str, inputs: &QueryInputs, output: Option<&Path>) -> anyhow::Result<String> {
    let query = context_for(sql, inputs).await?;
    let frame = query.sql(sql).await?;
    match output {
        Some(path) => {
            let sink = sink_for_path(path)?;
            let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
            let mut writer = SinkWriter::open(&sink, schema)?;
            let mut stream = frame.execute_stream().await?;
            while let Some(batch) = stream.next().await {
                writer.write(&batch?)?;
            }
            let rows = writer.finish()?;
            Ok(format!("wrote {rows} rows to {}", path.display()))
        }
        None => {
            let batches = frame.collect().await?;
            Ok(pretty_format_batches(&batches)?.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_function_names() {
        assert!(super::mentioned("SELECT MiniLM(text) FROM t", "minilm"));
        assert!(!super::mentioned("SELECT minilm_x(text) FROM t", "minilm"));
    }
}
