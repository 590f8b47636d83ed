//! Locating and loading the ONNX Runtime shared library (`ort`'s `load-dynamic`).
//!
//! Order: `ORT_DYLIB_PATH`; else a copy in ferry's cache; else PyPI's `onnxruntime` wheel fetched
//! with pip and the library extracted into the cache.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// NVIDIA CUDA, falling back to CPU (with a warning) when the runtime library or machine has
    /// no CUDA support. Needs ORT_DYLIB_PATH pointing at an onnxruntime-gpu build.
    Cuda,
}

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<Environment, RuntimeError> {
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        tracing::debug!(path = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(&path).map_err(|source| {
            RuntimeError::Load {
                path: path.clone(),
                source,
            }
            .to_string()
        })?;
        builder
            .with_name("ferry")
            .build()
            .map_err(|e| RuntimeError::Environment(e.to_string()).to_string())
    })
    .clone()
    .map_err(RuntimeError::Unavailable)
}

/// Finds the runtime library, provisioning it into the cache if needed.
pub fn library_path() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
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
