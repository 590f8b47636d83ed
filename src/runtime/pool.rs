//! A fixed set of worker threads, each owning one ONNX Runtime session of the same model.
//!
//! `Session::run` takes `&mut self`, and inference is CPU-heavy: it must never run on DataFusion's
//! async workers. Jobs are closures handed to whichever worker is free; the caller awaits the
//! result without blocking the runtime.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::value::ValueType;
use thiserror::Error;

use super::onnxruntime::{ExecutionProvider, RuntimeError, environment};

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{path}: cannot create an ONNX Runtime session: {message}")]
    Session { path: PathBuf, message: String },
    #[error("the model workers have stopped (a worker panicked or the pool was dropped)")]
    Stopped,
}

/// Name, element type and shape (-1 for dynamic axes) of a model input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub element: Option<ort::value::TensorElementType>,
    pub shape: Vec<i64>,
}

impl TensorInfo {
    fn from_outlet(name: &str, dtype: &ValueType) -> Self {
        match dtype {
            ValueType::Tensor { ty, shape, .. } => TensorInfo {
                name: name.to_string(),
                element: Some(*ty),
                shape: shape.iter().copied().collect(),
            },
            _ => TensorInfo {
                name: name.to_string(),
                element: None,
                shape: Vec::new(),
            },
        }
    }
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// Sessions for one model, one per worker thread.
pub struct SessionPool {
    sender: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub provider: ExecutionProvider,
    pub threads_per_worker: usize,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("workers", &self.workers.len())
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// How many sessions and threads to use.
#[derive(Debug, Clone, Copy)]
pub struct PoolSize {
    pub workers: usize,
    pub threads_per_worker: usize,
}

impl PoolSize {
    /// Default: one session using every core. Each session holds its own copy of the
    /// activations (and part of the weights), so one session keeps memory lowest; measured on
    /// all-MiniLM-L6-v2 over 2,000 paragraphs on 2 cores: 1 x 2 threads ran at 0.93x the rows/s of
    /// 2 x 1 thread with 0.64x the peak memory. Short texts and tiny models favour more workers.
    pub fn for_machine() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        PoolSize {
            workers: 1,
            threads_per_worker: cores,
        }
    }
}

fn build_session(
    path: &Path,
    provider: ExecutionProvider,
    threads: usize,
    prepacked: &PrepackedWeights,
) -> Result<Session, PoolError> {
    let env = environment()?;
    let err = |e: &dyn std::fmt::Display| PoolError::Session {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut builder = Session::builder(&env)
        .map_err(|e| err(&e))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| err(&e))?
        .with_intra_threads(threads)
        .map_err(|e| err(&e))?
        .with_inter_threads(1)
        .map_err(|e| err(&e))?
        // The workers' sessions share one copy of the weights ONNX Runtime re-lays out.
        .with_prepacked_weights(prepacked)
        .map_err(|e| err(&e))?;
    // Input shapes change with every chunk, so a memory plan per shape only costs memory.
    builder = builder.with_memory_pattern(false).map_err(|e| err(&e))?;
    if provider == ExecutionProvider::Cuda {
        use ort::ep::ExecutionProvider as _;
        let available = ort::ep::CUDA::is_available().unwrap_or(false);
        let registered = if available {
            ort::ep::CUDA::default()
                .register(&mut builder)
                .map_err(|e| e.to_string())
        } else {
            Err("this ONNX Runtime library was built without CUDA".to_string())
        };
        if let Err(reason) = registered {
            tracing::warn!(
                model = %path.display(),
                %reason,
                "CUDA requested but unavailable; running on CPU"
            );
        }
    }
    builder.commit_from_file(path).map_err(|e| err(&e))
}

impl SessionPool {
    /// Creates every worker's session now (plan time), so that a broken model fails before any
    /// data is read.
    pub fn open(
        path: &Path,
        provider: ExecutionProvider,
        size: PoolSize,
    ) -> Result<Self, PoolError> {
        let workers = size.workers.max(1);
        environment()?;
        let prepacked = PrepackedWeights::new();
        let mut sessions = Vec::with_capacity(workers);
        for _ in 0..workers {
            let threads = size.threads_per_worker.max(1);
            sessions.push(build_session(path, provider, threads, &prepacked)?);
        }
        let inputs = sessions[0]
            .inputs()
            .iter()
            .map(|o| TensorInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let outputs = sessions[0]
            .outputs()
            .iter()
            .map(|o| TensorInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let handles = sessions
            .into_iter()
            .enumerate()
            .map(|(i, mut session)| {
                let receiver = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-model-{i}"))
                    .spawn(move || {
                        while let Ok(job) = receiver.recv() {
                            job(&mut session);
                        }
                    })
                    .expect("spawning a model worker thread")
            })
            .collect();
        Ok(SessionPool {
            sender: Some(sender),
            workers: handles,
            inputs,
            outputs,
            provider,
            threads_per_worker: size.threads_per_worker.max(1),
        })
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    pub fn input(&self, name: &str) -> Option<&TensorInfo> {
        self.inputs.iter().find(|i| i.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorInfo> {
        self.outputs.iter().find(|o| o.name == name)
    }

    fn submit(&self, job: Job) -> Result<(), PoolError> {
        self.sender
            .as_ref()
            .ok_or(PoolError::Stopped)?
            .send(job)
            .map_err(|_| PoolError::Stopped)
    }

    /// Runs `f` on a free worker's session and waits for it without blocking the async runtime.
    pub async fn run<R, F>(&self, f: F) -> Result<R, PoolError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Session) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |session| {
            let _ = tx.send(f(session));
        }))?;
        rx.await.map_err(|_| PoolError::Stopped)
    }
}

impl Drop for SessionPool {
    fn drop(&mut self) {
        self.sender.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
