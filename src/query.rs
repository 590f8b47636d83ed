//! `ferry query`: SQL over pipeline outputs and other files, with operators as functions.

use std::path::{Path, PathBuf};

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::engine::{OperatorSet, session_context_for};
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
}

/// Registers the outputs of every pipeline in `dir` that has been run. Returns their names.
pub async fn register_pipeline_outputs(ctx: &SessionContext, dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return names;
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
        let Ok(p) = crate::spec::load_pipeline(&file) else {
            tracing::debug!(file = %file.display(), "skipping invalid pipeline");
            continue;
        };
        let (out, src) = match &p.pipeline.sink {
            crate::spec::Sink::RollingParquet(r) => (
                r.dir.clone(),
                Ok(crate::spec::Source::Parquet(crate::spec::FileSource {
                    path: r.dir.to_string_lossy().into_owned(),
                })),
            ),
            sink => match sink.path() {
                Some(out) => (out.clone(), source::source_for_path(&out.to_string_lossy())),
                None => continue,
            },
        };
        if !out.exists() {
            continue;
        }
        let registered = match src {
            Ok(src) => source::register(ctx, &p.pipeline.name, &src).await,
            Err(e) => Err(e),
        };
        match registered {
            Ok(()) => names.push(p.pipeline.name.clone()),
            Err(e) => {
                tracing::warn!(pipeline = %p.pipeline.name, error = %e, "cannot register output")
            }
        }
    }
    names
}

/// Words in `sql` that could be function names; used to load only the operators a query calls.
fn mentioned(sql: &str, name: &str) -> bool {
    let lower = sql.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == name)
}

/// Builds a context with tables and the operators `sql` mentions.
pub async fn context_for(
    sql: &str,
    inputs: &QueryInputs,
) -> anyhow::Result<(SessionContext, OperatorSet)> {
    let mut operators = match &inputs.operators_dir {
        Some(dir) if dir.is_dir() => OperatorSet::new(crate::ops::load_manifests(dir)?),
        _ => OperatorSet::default(),
    };
    let wanted: Vec<String> = operators
        .names()
        .into_iter()
        .filter(|n| mentioned(sql, n))
        .map(str::to_string)
        .collect();
    let mut udfs = Vec::new();
    for name in wanted {
        let op = operators.get(&name).map_err(anyhow::Error::msg)?;
        udfs.push((op.task, op.udf.clone()));
    }
    // The batch size depends on the operators' tasks (images: small batches).
    let ctx = session_context_for(udfs.iter().map(|(task, _)| *task));
    for (_, udf) in udfs {
        ctx.register_udf(udf);
    }
    if let Some(dir) = &inputs.pipelines_dir {
        register_pipeline_outputs(&ctx, dir).await;
    }
    for (name, path) in &inputs.tables {
        source::register_file(&ctx, name, path)
            .await
            .map_err(|e| anyhow::anyhow!("--table {name}={path}: {e}"))?;
    }
    Ok((ctx, operators))
}

/// Runs `sql`; prints a table, or writes `output` (format from its extension).
pub async fn run(sql: &str, inputs: &QueryInputs, output: Option<&Path>) -> anyhow::Result<String> {
    let (ctx, _operators) = context_for(sql, inputs).await?;
    let frame = ctx.sql(sql).await?;
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
