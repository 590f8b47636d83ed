//! Locating and loading the ONNX Runtime shared library (`ort`'s `load-dynamic`).
//!
//! Order: `ORT_DYLIB_PATH`; else a copy in ferry's cache; else PyPI's `onnxruntime` wheel fetched
//! with pip and the library extracted into the cache.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use ort::environment::Environment;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::cuda::{CudaOptions, Fallback};
use super::wheel::{self, WheelError};

/// The ONNX Runtime release ferry is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime could not be provisioned: {source}\n\
         set ORT_DYLIB_PATH to a libonnxruntime.so (>= 1.24), e.g. one extracted from PyPI's \
         onnxruntime=={ORT_VERSION} wheel (onnxruntime/capi/libonnxruntime.so.{ORT_VERSION})"
    )]
    Provision { source: WheelError },
    #[error(
        "cannot load ONNX Runtime from {path}: {source}\nset ORT_DYLIB_PATH to a libonnxruntime.so of version 1.24 or newer"
    )]
    Load {
        path: PathBuf,
        source: ort::LoadDynamicError,
    },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(String),
    /// An earlier failure, remembered so that every operator reports it.
    #[error("{0}")]
    Unavailable(String),
}

/// Where an operator's model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels.
    #[default]
    Cpu,
    /// NVIDIA CUDA, with ONNX Runtime's CUDA build (fetched from PyPI on first use, with the
    /// NVIDIA libraries it needs). When it cannot be used, the manifest's `fallback` decides.
    Cuda,
}

/// Where a session runs, with the provider's settings and what to do when it cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Placement {
    pub provider: ExecutionProvider,
    pub cuda: CudaOptions,
    pub fallback: Fallback,
}

impl From<ExecutionProvider> for Placement {
    fn from(provider: ExecutionProvider) -> Self {
        Placement {
            provider,
            ..Default::default()
        }
    }
}

/// The loaded runtime library, and whether CUDA can be used with it.
struct Loaded {
    env: Environment,
    path: PathBuf,
    /// Why sessions cannot use CUDA in this process, if known before trying.
    cuda: Result<(), String>,
}

static ENV: OnceLock<Result<Loaded, String>> = OnceLock::new();
static WANT_CUDA: AtomicBool = AtomicBool::new(false);

/// Asks for ONNX Runtime's CUDA build (which runs CPU sessions too) when the library is loaded,
/// that is before the first session is created. Planning calls it when a step's operator has
/// `provider: cuda`.
pub fn want_cuda() {
    WANT_CUDA.store(true, Ordering::Relaxed);
}

fn loaded() -> Result<&'static Loaded, RuntimeError> {
    ENV.get_or_init(|| {
        let (path, cuda) = choose_library().map_err(|e| e.to_string())?;
        tracing::debug!(path = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(&path).map_err(|source| {
            RuntimeError::Load {
                path: path.clone(),
                source,
            }
            .to_string()
        })?;
        let env = builder
            .with_name("ferry")
            .build()
            .map_err(|e| RuntimeError::Environment(e.to_string()).to_string())?;
        Ok(Loaded { env, path, cuda })
    })
    .as_ref()
    .map_err(|e| RuntimeError::Unavailable(e.clone()))
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<Environment, RuntimeError> {
    loaded().map(|l| l.env.clone())
}

/// The runtime library this process loaded (loading it if it has not yet).
pub fn library_in_use() -> Result<PathBuf, RuntimeError> {
    loaded().map(|l| l.path.clone())
}

/// Whether sessions of this process can ask for CUDA: `Err` says why not. (A library that has
/// CUDA can still fail to create a session on a machine without a GPU.)
pub fn cuda_status() -> Result<(), String> {
    let loaded = loaded().map_err(|e| e.to_string())?;
    loaded.cuda.clone()?;
    use ort::ep::ExecutionProvider as _;
    match ort::ep::CUDA::is_available() {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "{} is a build of ONNX Runtime without CUDA",
            loaded.path.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The library to load, and whether CUDA can be used with it: `ORT_DYLIB_PATH`; else the CUDA
/// build when [`want_cuda`] was called (the CPU build, and the reason, if it cannot be had); else
/// the CPU build.
fn choose_library() -> Result<(PathBuf, Result<(), String>), RuntimeError> {
    let wanted = WANT_CUDA.load(Ordering::Relaxed);
    let preload = || {
        let dirs = super::cuda::library_dirs();
        if dirs.is_empty() {
            return Ok(());
        }
        let preloaded = super::cuda::preload(&dirs)?;
        tracing::debug!(loaded = preloaded.loaded.len(), "NVIDIA libraries loaded");
        for (lib, reason) in &preloaded.failed {
            tracing::debug!(%lib, %reason, "an NVIDIA library did not load");
        }
        Ok(())
    };
    if let Some(p) = ort_dylib_path() {
        let cuda = if wanted { preload() } else { Ok(()) };
        return Ok((p, cuda));
    }
    if !wanted {
        let why = "ONNX Runtime's CPU build was loaded (no operator asked for CUDA before the first model loaded)";
        return Ok((library_path()?, Err(why.to_string())));
    }
    match super::cuda::gpu_library() {
        Ok(lib) => Ok((lib, preload())),
        Err(e) => {
            let why = format!("the CUDA build of ONNX Runtime could not be fetched: {e}");
            tracing::warn!(reason = %why, "loading the CPU build");
            Ok((library_path()?, Err(why)))
        }
    }
}

/// The library `ORT_DYLIB_PATH` names, if set.
pub fn ort_dylib_path() -> Option<PathBuf> {
    std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Finds the runtime library, provisioning it into the cache if needed.
pub fn library_path() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = ort_dylib_path() {
        return Ok(p);
    }
    let file = format!("libonnxruntime.so.{ORT_VERSION}");
    let cached = super::cache_dir()
        .join("onnxruntime")
        .join(ORT_VERSION)
        .join(&file);
    if cached.is_file() {
        return Ok(cached);
    }
    tracing::info!(
        version = ORT_VERSION,
        "fetching ONNX Runtime from PyPI (first use only)"
    );
    let download = tempdir_in_cache("onnxruntime-wheel");
    let result = wheel::download(&format!("onnxruntime=={ORT_VERSION}"), &download)
        .and_then(|whl| wheel::read_member(&whl, &format!("capi/{file}")))
        .and_then(|bytes| wheel::write_atomically(&cached, &bytes));
    let _ = std::fs::remove_dir_all(&download);
    result.map_err(|source| RuntimeError::Provision { source })?;
    Ok(cached)
}

fn tempdir_in_cache(what: &str) -> PathBuf {
    super::cache_dir()
        .join("tmp")
        .join(format!("{what}-{}", std::process::id()))
}
