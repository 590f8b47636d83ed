//! Batch jobs on an Apache DataFusion Ballista cluster.
//!
//! `ferry scheduler` and `ferry executor` are Ballista's scheduler and executor processes with
//! ferry's operators registered as functions: each loads the operator manifests (and their
//! models) when it starts. `ferry run PIPELINE --cluster df://HOST:PORT` plans the pipeline on the
//! client as a local run would, and the cluster runs it: the executors read the source files
//! (a path every machine sees the same, or an object store), run the operators, and write the
//! result's Parquet files; no row passes through the client. Ballista resolves a function by
//! name wherever a plan is decoded, so the client, the scheduler (which plans the stages) and
//! every executor must know the same operators.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::config::SessionConfig;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

use crate::engine::RunSummary;
use crate::ops::OperatorSet;
use crate::spec::LoadedPipeline;

/// How often an executor reports to the scheduler.
pub const EXECUTOR_HEARTBEAT_SECONDS: u64 = 5;

/// Every operator in `dir`, built (models loaded), with ferry's plain functions: what each
/// process of a cluster registers.
pub fn load_functions(dir: &Path) -> anyhow::Result<(OperatorSet, Vec<Arc<ScalarUDF>>)> {
    let mut functions = vec![Arc::new(crate::ops::similarity::cosine_similarity())];
    if !dir.is_dir() {
        return Ok((OperatorSet::default(), functions));
    }
    let mut set = OperatorSet::new(crate::ops::load_manifests(dir)?);
    let names: Vec<String> = set.names().into_iter().map(str::to_string).collect();
    set.will_use(names.iter().map(String::as_str));
    for name in &names {
        let op = set.get(name).map_err(anyhow::Error::msg)?;
        functions.push(Arc::new(op.udf.clone()));
        tracing::info!(operator = %name, task = ?op.task, "operator registered");
    }
    Ok((set, functions))
}

/// Runs a scheduler on `bind` until the process is stopped. An executor not heard from for
/// `executor_timeout` (they report every 5 s) is taken as lost: its tasks run again elsewhere.
pub async fn scheduler(
    bind: SocketAddr,
    operators: &Path,
    executor_timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let (_set, functions) = load_functions(operators)?;
    let builder = Arc::new(move |config: SessionConfig| {
        let state = ballista_core::utils::default_session_builder(config)?;
        let mut state =
            crate::engine::with_rules(SessionStateBuilder::new_from_existing(state)).build();
        for f in &functions {
            state.register_udf(Arc::clone(f))?;
        }
        Ok(state)
    });
    let mut config = SchedulerConfig::default().with_override_session_builder(builder);
    config.bind_host = bind.ip().to_string();
    config.bind_port = bind.port();
    config.external_host = bind.ip().to_string();
    let timeout = executor_timeout
        .as_secs()
        .max(EXECUTOR_HEARTBEAT_SECONDS + 1);
    config.executor_timeout_seconds = timeout;
    config.no_executors_grace_period_seconds = timeout;
    config.expire_dead_executor_interval_seconds = EXECUTOR_HEARTBEAT_SECONDS;
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .context("creating the scheduler's cluster state")?;
    start_server(cluster, bind, Arc::new(config))
        .await
        .context("running the scheduler")?;
    Ok(())
}

/// Where an executor listens and what it offers.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub scheduler: SocketAddr,
    pub bind_host: String,
    /// Arrow Flight port (shuffle data); gRPC is on `port + 1`.
    pub port: u16,
    /// Tasks run at once (default: the number of cores).
    pub slots: Option<usize>,
    pub work_dir: Option<PathBuf>,
}

/// Runs an executor until the process is stopped.
pub async fn executor(options: ExecutorOptions, operators: &Path) -> anyhow::Result<()> {
    let (_set, functions) = load_functions(operators)?;
    // Every function a full session has (nested ones such as `cardinality` too, which
    // Ballista's default registry lacks), and the operators.
    let mut state = SessionStateBuilder::new().with_default_features().build();
    for f in functions {
        state.register_udf(f)?;
    }
    let registry = BallistaFunctionRegistry::from(&state);
    let mut config = ExecutorProcessConfig {
        scheduler_host: options.scheduler.ip().to_string(),
        scheduler_port: options.scheduler.port(),
        bind_host: options.bind_host.clone(),
        external_host: Some(options.bind_host.clone()),
        port: options.port,
        grpc_port: options.port + 1,
        work_dir: options
            .work_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned()),
        override_function_registry: Some(Arc::new(registry)),
        executor_heartbeat_interval_seconds: EXECUTOR_HEARTBEAT_SECONDS,
        ..Default::default()
    };
    if let Some(slots) = options.slots {
        config.vcores = slots.max(1);
    }
    start_executor_process(Arc::new(config))
        .await
        .context("running the executor")?;
    Ok(())
}

/// The scheduler address of `df://HOST:PORT`.
pub fn scheduler_url(cluster: &str) -> anyhow::Result<String> {
    let rest = cluster.strip_prefix("df://").with_context(|| {
        format!("--cluster takes df://HOST:PORT (the scheduler's address), got '{cluster}'")
    })?;
    if !rest.contains(':') || rest.ends_with(':') {
        anyhow::bail!("--cluster {cluster}: no port (df://HOST:PORT)");
    }
    Ok(format!("df://{rest}"))
}

/// A session context whose queries run on the cluster at `cluster` (`df://HOST:PORT`), as the
/// job `name`, with ferry's plain functions registered.
pub async fn remote_context(
    cluster: &str,
    name: &str,
    batch_rows: usize,
) -> anyhow::Result<SessionContext> {
    let url = scheduler_url(cluster)?;
    let config = SessionConfig::new_with_ballista()
        .with_batch_size(batch_rows)
        .with_ballista_job_name(name);
    let ctx = SessionContext::remote_with_state(&url, crate::engine::session_state(config))
        .await
        .with_context(|| format!("connecting to the scheduler at {url}"))?;
    crate::engine::register_functions(&ctx);
    Ok(ctx)
}

/// Plans `loaded` against the cluster and runs it there. The sink's path becomes a directory of
/// Parquet files (one per partition of the result, written by the executors); it appears under
/// its name only when the job has succeeded.
pub async fn run(
    loaded: &LoadedPipeline,
    operators: &mut OperatorSet,
    cluster: &str,
) -> anyhow::Result<RunSummary> {
    let start = Instant::now();
    let spec = &loaded.pipeline;
    let crate::spec::Sink::Parquet(sink) = &spec.sink else {
        anyhow::bail!(
            "{}: a cluster run writes Parquet (the executors write its files); this sink is {}",
            loaded.file.display(),
            spec.sink.format()
        );
    };
    if spec.is_stream() {
        anyhow::bail!("streams scale by consumer groups (run more ferry processes), not --cluster");
    }
    let batch_rows = crate::engine::batch_rows(crate::engine::pipeline_tasks(spec, operators));
    let ctx = remote_context(cluster, &spec.name, batch_rows).await?;
    let planned = crate::engine::plan_in(loaded, operators, ctx)
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    let out = &sink.path;
    let name = out
        .file_name()
        .context("the sink path has no file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = out.with_file_name(format!(".{name}.cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = planned
        .frame
        .write_parquet(
            &format!("{}/", tmp.display()),
            DataFrameWriteOptions::new(),
            None,
        )
        .await;
    let written = match written {
        Ok(batches) => batches,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(anyhow::anyhow!(
                "the cluster job failed; nothing was written to {}: {}",
                out.display(),
                crate::error::df_message(&e)
            ));
        }
    };
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::UInt64Type;
    let rows: u64 = written
        .iter()
        .filter(|b| b.num_columns() > 0)
        .map(|b| {
            b.column(0)
                .as_primitive_opt::<UInt64Type>()
                .map_or(0, |c| c.values().iter().sum::<u64>())
        })
        .sum();
    if out.is_dir() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    } else if out.exists() {
        std::fs::remove_file(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("moving the result to {}", out.display()))?;
    Ok(RunSummary {
        rows,
        elapsed: start.elapsed(),
        row_errors: 0,
        resumed: None,
        model_inputs: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_addresses_are_df_urls() {
        assert_eq!(
            scheduler_url("df://127.0.0.1:50050").unwrap(),
            "df://127.0.0.1:50050"
        );
        assert!(scheduler_url("127.0.0.1:50050").is_err());
        assert!(scheduler_url("df://host").is_err());
    }
}
