//! A fixed set of worker threads, each owning its own sessions of an operator's model files
//! (one file for an encoder; encoder + decoder, or detector + recognizer, for others; graphs
//! ferry builds in memory, such as embed's pooling, after them) and any state a task keeps
//! between calls (buffers, caches). A session's output can stay in its device's memory for the
//! next session of the same worker ([`Worker::run_kept`]).
//!
//! `Session::run` takes `&mut self`, and inference is CPU-heavy: it must never run on DataFusion's
//! async workers. Jobs are closures handed to whichever worker is free; the caller awaits the
//! result without blocking the runtime.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::{OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, ValueType};
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
    /// The names of dynamic axes ("" where unnamed or fixed).
    pub symbols: Vec<String>,
}

impl TensorInfo {
    pub(crate) fn from_outlet(name: &str, dtype: &ValueType) -> Self {
        match dtype {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => TensorInfo {
                name: name.to_string(),
                element: Some(*ty),
                shape: shape.iter().copied().collect(),
                symbols: dimension_symbols.iter().cloned().collect(),
            },
            _ => TensorInfo {
                name: name.to_string(),
                element: None,
                shape: Vec::new(),
                symbols: Vec::new(),
            },
        }
    }
}

/// One of an operator's model files, by the role its task gives it (`model`, `encoder`,
/// `decoder`, ...).
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub role: &'static str,
    /// The ONNX file; for a graph built in memory, the model file it belongs to (for messages).
    pub path: PathBuf,
    /// A graph built in memory instead of read from `path`.
    pub graph: Option<BuildGraph>,
    /// A rewrite of the model read from `path`, applied once before its sessions are made.
    pub edit: Option<EditModel>,
}

impl ModelFile {
    pub fn new(role: &'static str, path: PathBuf) -> Self {
        ModelFile {
            role,
            path,
            graph: None,
            edit: None,
        }
    }
}

/// Rewrites a serialized ONNX model (e.g. to share a decoder's cross-attention cache between
/// beams); None leaves the model as it is. An error is logged and the model used as it is.
pub type EditModel = fn(&[u8]) -> Result<Option<Vec<u8>>, String>;

/// The model bytes `file`'s edit made, None when it has none or left the model as it is.
fn edited(file: &ModelFile) -> Option<Vec<u8>> {
    let edit = file.edit?;
    // A file that cannot be read is reported by the session that reads it.
    let bytes = std::fs::read(&file.path).ok()?;
    match edit(&bytes) {
        Ok(Some(edited)) => {
            tracing::debug!(model = %file.path.display(), "model rewritten in memory");
            Some(edited)
        }
        Ok(None) => None,
        Err(reason) => {
            tracing::warn!(model = %file.path.display(), %reason, "the model is used as it is");
            None
        }
    }
}

/// Builds a small graph in memory (post-processing that runs on the model's device, e.g.
/// pooling token vectors into one), from what the sessions before it in the pool take and
/// return; `None` when the operator does not need it (no session with that role is made).
#[derive(Clone)]
pub struct BuildGraph(pub Arc<GraphFn>);

/// See [`BuildGraph`].
pub type GraphFn =
    dyn Fn(&[SessionInfo]) -> Result<Option<ort::editor::Model>, String> + Send + Sync;

impl std::fmt::Debug for BuildGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildGraph")
    }
}

/// Where a session's values live: where outputs kept for a following session stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda(i32),
}

impl Device {
    fn memory(self) -> Result<MemoryInfo<'static>, String> {
        let (device, id) = match self {
            Device::Cpu => (AllocationDevice::CPU, 0),
            Device::Cuda(id) => (AllocationDevice::CUDA, id),
        };
        MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
            .map_err(|e| e.to_string())
    }
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

/// Outputs taken out of a session run, by name.
pub type Fetched = Vec<(String, DynValue)>;

/// One of a worker's sessions.
struct Held {
    info: SessionInfo,
    session: Session,
    device: Device,
    /// Page-locked host memory for the inputs of a CUDA session (the GPU copies from it
    /// directly, without staging the values through a pinned buffer of its own first); None on
    /// the CPU, or when the provider offers none.
    pinned: Option<Allocator>,
}

impl Held {
    fn new(info: SessionInfo, session: Session, device: Device) -> Self {
        let pinned = match device {
            Device::Cpu => None,
            Device::Cuda(_) => MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                0,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )
            .and_then(|memory| Allocator::new(&session, memory))
            .map_err(|e| {
                tracing::warn!(model = %info.path.display(), error = %e, "no pinned host memory for CUDA inputs; inputs are copied from ordinary memory");
            })
            .ok(),
        };
        Held {
            info,
            session,
            device,
            pinned,
        }
    }

    /// The session values of `inputs`, each converted to the element type the model declares.
    fn values(&self, inputs: Vec<Input>) -> Result<Vec<(String, DynValue)>, String> {
        inputs
            .into_iter()
            .map(|input| {
                let want = self.info.input(&input.name).and_then(|i| i.element);
                let name = input.name.clone();
                Ok((name, input.into_dyn_in(want, self.pinned.as_ref())?))
            })
            .collect()
    }
}

/// A worker thread's sessions and the state tasks keep on it between calls.
pub struct Worker {
    sessions: Vec<Held>,
    state: HashMap<TypeId, Box<dyn Any + Send>>,
}

impl Worker {
    /// The session of the model file with this role.
    pub fn session(&mut self, role: &str) -> Result<&mut Session, String> {
        self.entry(role).map(|held| &mut held.session)
    }

    fn entry(&mut self, role: &str) -> Result<&mut Held, String> {
        self.sessions
            .iter_mut()
            .find(|held| held.info.role == role)
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
        let held = self.entry(role)?;
        let mut values: Vec<(String, SessionInputValue<'v>)> = held
            .values(inputs)?
            .into_iter()
            .map(|(name, value)| (name, value.into()))
            .collect();
        values.extend(ready);
        held.session.run(values).map_err(|e| e.to_string())
    }

    /// [`Worker::run`] returning only the outputs named, in that order: the others are not
    /// copied off the model's device.
    pub fn run_selected(
        &mut self,
        role: &str,
        inputs: Vec<Input>,
        outputs: &[String],
    ) -> Result<Fetched, String> {
        let held = self.entry(role)?;
        let values = held.values(inputs)?;
        let selector = outputs
            .iter()
            .fold(OutputSelector::no_default(), |s, name| s.with(name));
        let options = RunOptions::new()
            .map_err(|e| e.to_string())?
            .with_outputs(selector);
        let mut out = held
            .session
            .run_with_options(values, &options)
            .map_err(|e| e.to_string())?;
        Ok(outputs
            .iter()
            .filter_map(|name| out.remove(name).map(|v| (name.clone(), v)))
            .collect())
    }

    /// Runs the session `role` and keeps its output `output` where the session ran (on the
    /// GPU for a CUDA session), for a following session of this worker to take as an input.
    pub fn run_kept(
        &mut self,
        role: &str,
        inputs: Vec<Input>,
        output: &str,
    ) -> Result<DynValue, String> {
        let held = self.entry(role)?;
        let err = |e: ort::Error| e.to_string();
        let mut binding = held.session.create_binding().map_err(err)?;
        for (name, value) in held.values(inputs)? {
            binding.bind_input(name, &value).map_err(err)?;
        }
        binding
            .bind_output_to_device(output, &held.device.memory()?)
            .map_err(err)?;
        let mut outputs = held.session.run_binding(&binding).map_err(err)?;
        outputs
            .remove(output)
            .ok_or_else(|| format!("the model returned no '{output}'"))
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

/// What a session is made from: an ONNX file, or a graph built in memory.
enum Source<'a> {
    File(&'a Path),
    /// A model file's bytes as its edit left them.
    Memory(&'a [u8]),
    /// Built for each session (creating a session consumes the graph), from the sessions
    /// before it.
    Graph(&'a BuildGraph, &'a [SessionInfo]),
}

fn build_session(
    path: &Path,
    source: &Source<'_>,
    placement: &Placement,
    threads: usize,
    prepacked: &PrepackedWeights,
) -> Result<(Session, ExecutionProvider), PoolError> {
    if placement.provider == ExecutionProvider::Cuda {
        match build_session_on(source, Some(placement), threads, prepacked) {
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
    let session = build_session_on(source, None, threads, prepacked).map_err(|message| {
        PoolError::Session {
            path: path.to_path_buf(),
            message,
        }
    })?;
    Ok((session, ExecutionProvider::Cpu))
}

/// A session on the CPU, or with the CUDA provider registered (an error if it cannot be).
fn build_session_on(
    source: &Source<'_>,
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
    match source {
        Source::File(path) => builder.commit_from_file(path),
        Source::Memory(bytes) => builder.commit_from_memory(bytes),
        Source::Graph(graph, before) => match (graph.0)(before)? {
            Some(model) => model.into_session(&builder),
            None => return Err("the graph is not needed".to_string()),
        },
    }
    .map_err(|e| err(&e))
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
        let edits: Vec<Option<Vec<u8>>> = files.iter().map(edited).collect();
        let mut per_worker = Vec::with_capacity(workers);
        // Where the sessions run: once CUDA could not be used (and the fallback allows the
        // CPU), the remaining sessions go to the CPU without trying CUDA again.
        let mut placement = placement;
        for _ in 0..workers {
            let mut sessions: Vec<Held> = Vec::with_capacity(files.len());
            for ((file, prepacked), edit) in files.iter().zip(&prepacked).zip(&edits) {
                let before: Vec<SessionInfo>;
                let source = match (&file.graph, edit) {
                    (None, Some(bytes)) => Source::Memory(bytes),
                    (None, None) => Source::File(&file.path),
                    (Some(graph), _) => {
                        before = sessions.iter().map(|h| h.info.clone()).collect();
                        let needed = (graph.0)(&before).map_err(|message| PoolError::Session {
                            path: file.path.clone(),
                            message,
                        })?;
                        if needed.is_none() {
                            continue;
                        }
                        Source::Graph(graph, &before)
                    }
                };
                // A graph built here is small post-processing: it runs on the worker's own
                // thread, without a thread pool whose spinning threads would take the cores
                // from the model's (measured: 0.75x the rows/s of host pooling with one, on 2
                // cores).
                let threads = match source {
                    Source::File(_) | Source::Memory(_) => threads,
                    Source::Graph(..) => 1,
                };
                let (session, on) =
                    build_session(&file.path, &source, &placement, threads, prepacked)?;
                placement.provider = on;
                let device = match on {
                    ExecutionProvider::Cuda => Device::Cuda(placement.cuda.device_id as i32),
                    ExecutionProvider::Cpu => Device::Cpu,
                };
                sessions.push(Held::new(info(file, &session), session, device));
            }
            per_worker.push(sessions);
        }
        let infos = per_worker[0].iter().map(|h| h.info.clone()).collect();
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
