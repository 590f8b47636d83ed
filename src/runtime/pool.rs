//! A fixed set of worker threads, each owning its own sessions of an operator's model files
//! (one file for an encoder; encoder + decoder, or detector + recognizer, for others) and any
//! state a task keeps between calls (buffers, caches).
//!
//! `Session::run` takes `&mut self`, and inference is CPU-heavy: it must never run on DataFusion's
//! async workers. Jobs are closures handed to whichever worker is free; the caller awaits the
//! result without blocking the runtime.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::ValueType;
use thiserror::Error;

use super::cuda::Fallback;
use super::onnxruntime::{ExecutionProvider, Placement, RuntimeError, environment};
use super::tensor::Input;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{path}: cannot create an ONNX Runtime session: {message}")]
    Session { path: PathBuf, message: String },
    #[error(
        "{path}: provider cuda cannot be used: {reason}\n`ferry doctor` shows the driver, CUDA and which providers load; `ferry runtime fetch --gpu` fetches ONNX Runtime's CUDA build; or set `fallback: cpu` in the manifest to run on the CPU instead"
    )]
    Cuda { path: PathBuf, reason: String },
    #[error("the model workers have stopped (a job panicked or the pool was dropped)")]
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
    pub(crate) fn from_outlet(name: &str, dtype: &ValueType) -> Self {
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

/// One of an operator's model files, by the role its task gives it (`model`, `encoder`,
/// `decoder`, ...).
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub role: &'static str,
    pub path: PathBuf,
}

/// What a session takes and returns, read when it was created.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub role: &'static str,
    pub path: PathBuf,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// The model's custom metadata (e.g. YOLO exports' class `names`).
    pub metadata: HashMap<String, String>,
}

impl SessionInfo {
    pub fn input(&self, name: &str) -> Option<&TensorInfo> {
        self.inputs.iter().find(|i| i.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorInfo> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// The output names, for messages.
    pub fn output_names(&self) -> String {
        self.outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The input names, for messages.
    pub fn input_names(&self) -> String {
        self.inputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A worker thread's sessions and the state tasks keep on it between calls.
pub struct Worker {
    sessions: Vec<(SessionInfo, Session)>,
    state: HashMap<TypeId, Box<dyn Any + Send>>,
}

impl Worker {
    /// The session of the model file with this role.
    pub fn session(&mut self, role: &str) -> Result<&mut Session, String> {
        self.sessions
            .iter_mut()
            .find(|(info, _)| info.role == role)
            .map(|(_, s)| s)
            .ok_or_else(|| format!("the operator has no '{role}' model"))
    }

    /// Runs the session `role` on named inputs, each converted to the element type the model
    /// declares for it.
    pub fn run(&mut self, role: &str, inputs: Vec<Input>) -> Result<SessionOutputs<'_>, String> {
        self.run_with(role, inputs, Vec::new())
    }

    /// [`Worker::run`] with some inputs already ONNX Runtime values (a cache kept between
    /// steps), passed as they are.
    pub fn run_with<'v>(
        &mut self,
        role: &str,
        inputs: Vec<Input>,
        ready: Vec<(String, SessionInputValue<'v>)>,
    ) -> Result<SessionOutputs<'_>, String> {
        let (info, session) = self
            .sessions
            .iter_mut()
            .find(|(info, _)| info.role == role)
            .ok_or_else(|| format!("the operator has no '{role}' model"))?;
        let mut values = Vec::with_capacity(inputs.len());
        for input in inputs {
            let want = info.input(&input.name).and_then(|i| i.element);
            let name = input.name.clone();
            values.push((name, input.into_value(want)?));
        }
        values.extend(ready);
        session.run(values).map_err(|e| e.to_string())
    }

    /// State of type `T` kept on this worker between calls, created on first use.
    pub fn state<T: Default + Send + 'static>(&mut self) -> &mut T {
        self.state
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut::<T>()
            .expect("state is keyed by its type")
    }
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Worker threads, each with its own sessions of the same model files.
pub struct SessionPool {
    sender: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// The sessions each worker holds, in the order of the model files.
    pub sessions: Vec<SessionInfo>,
    pub provider: ExecutionProvider,
    pub threads_per_worker: usize,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("workers", &self.workers.len())
            .field("sessions", &self.sessions)
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
    /// Default: one worker using every core. Each worker holds its own copy of the
    /// activations (and part of the weights), so one keeps memory lowest; measured on
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
    placement: &Placement,
    threads: usize,
    prepacked: &PrepackedWeights,
) -> Result<(Session, ExecutionProvider), PoolError> {
    if placement.provider == ExecutionProvider::Cuda {
        match build_session_on(path, Some(placement), threads, prepacked) {
            Ok(session) => return Ok((session, ExecutionProvider::Cuda)),
            Err(reason) if placement.fallback == Fallback::Cpu => {
                tracing::warn!(
                    model = %path.display(),
                    %reason,
                    "provider cuda cannot be used; running on the CPU (fallback: cpu)"
                );
            }
            Err(reason) => {
                return Err(PoolError::Cuda {
                    path: path.to_path_buf(),
                    reason,
                });
            }
        }
    }
    let session =
        build_session_on(path, None, threads, prepacked).map_err(|message| PoolError::Session {
            path: path.to_path_buf(),
            message,
        })?;
    Ok((session, ExecutionProvider::Cpu))
}

/// A session on the CPU, or with the CUDA provider registered (an error if it cannot be).
fn build_session_on(
    path: &Path,
    cuda: Option<&Placement>,
    threads: usize,
    prepacked: &PrepackedWeights,
) -> Result<Session, String> {
    let env = environment().map_err(|e| e.to_string())?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
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
    if let Some(placement) = cuda {
        register_cuda(&mut builder, &placement.cuda)?;
    }
    builder.commit_from_file(path).map_err(|e| err(&e))
}

/// Registers the CUDA provider with `options` on a session builder, or says why it cannot be.
pub fn register_cuda(
    builder: &mut ort::session::builder::SessionBuilder,
    options: &super::cuda::CudaOptions,
) -> Result<(), String> {
    use ort::ep::ExecutionProvider as _;
    super::onnxruntime::cuda_status()?;
    options
        .provider()
        .register(builder)
        .map_err(|e| format!("registering the CUDA provider: {e}"))
}

fn info(file: &ModelFile, session: &Session) -> SessionInfo {
    let metadata = session
        .metadata()
        .ok()
        .map(|m| {
            m.custom_keys()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|k| m.custom(&k).map(|v| (k, v)))
                .collect()
        })
        .unwrap_or_default();
    SessionInfo {
        metadata,
        role: file.role,
        path: file.path.clone(),
        inputs: session
            .inputs()
            .iter()
            .map(|o| TensorInfo::from_outlet(o.name(), o.dtype()))
            .collect(),
        outputs: session
            .outputs()
            .iter()
            .map(|o| TensorInfo::from_outlet(o.name(), o.dtype()))
            .collect(),
    }
}

impl SessionPool {
    /// Creates every worker's sessions now (plan time), so that a broken model fails before any
    /// data is read.
    pub fn open(
        files: &[ModelFile],
        placement: impl Into<Placement>,
        size: PoolSize,
    ) -> Result<Self, PoolError> {
        let placement = placement.into();
        let workers = size.workers.max(1);
        let threads = size.threads_per_worker.max(1);
        environment()?;
        let prepacked: Vec<PrepackedWeights> =
            files.iter().map(|_| PrepackedWeights::new()).collect();
        let mut per_worker = Vec::with_capacity(workers);
        // Where the sessions run: once CUDA could not be used (and the fallback allows the
        // CPU), the remaining sessions go to the CPU without trying CUDA again.
        let mut placement = placement;
        for _ in 0..workers {
            let mut sessions = Vec::with_capacity(files.len());
            for (file, prepacked) in files.iter().zip(&prepacked) {
                let (session, on) = build_session(&file.path, &placement, threads, prepacked)?;
                placement.provider = on;
                sessions.push((info(file, &session), session));
            }
            per_worker.push(sessions);
        }
        let infos = per_worker[0].iter().map(|(i, _)| i.clone()).collect();
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let handles = per_worker
            .into_iter()
            .enumerate()
            .map(|(i, sessions)| {
                let receiver = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-model-{i}"))
                    .spawn(move || {
                        let mut worker = Worker {
                            sessions,
                            state: HashMap::new(),
                        };
                        while let Ok(job) = receiver.recv() {
                            // A job that panics loses its result (its caller hears Stopped), not
                            // the worker and its sessions.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                job(&mut worker)
                            }));
                        }
                    })
                    .expect("spawning a model worker thread")
            })
            .collect();
        Ok(SessionPool {
            sender: Some(sender),
            workers: handles,
            sessions: infos,
            provider: placement.provider,
            threads_per_worker: threads,
        })
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// What the session of `role` takes and returns.
    pub fn session(&self, role: &str) -> Option<&SessionInfo> {
        self.sessions.iter().find(|s| s.role == role)
    }

    fn submit(&self, job: Job) -> Result<(), PoolError> {
        self.sender
            .as_ref()
            .ok_or(PoolError::Stopped)?
            .send(job)
            .map_err(|_| PoolError::Stopped)
    }

    /// Runs `f` on a free worker and waits for it without blocking the async runtime.
    pub async fn run<R, F>(&self, f: F) -> Result<R, PoolError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Worker) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |worker| {
            let _ = tx.send(f(worker));
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
