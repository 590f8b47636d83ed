//! Everything about running ONNX models: finding the runtime library, reading a model directory,
//! and the pool of workers that own the sessions.

pub mod cuda;
pub mod doctor;
pub mod model_dir;
pub mod onnxruntime;
pub mod pool;
pub mod tensor;
pub mod wheel;

pub use model_dir::ModelDir;
pub use onnxruntime::{ExecutionProvider, environment};
pub use pool::SessionPool;

/// Where ferry keeps what it downloads (the runtime library, fetched models):
/// `FERRY_CACHE`, else the user's cache directory.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_CACHE").filter(|v| !v.is_empty()) {
        return dir.into();
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("ferry")
}
