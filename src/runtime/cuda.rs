//! CUDA: an operator's GPU settings, the fallback rule, and provisioning the CUDA build of ONNX
//! Runtime with the NVIDIA libraries it needs, all from PyPI, so that a machine with only an
//! NVIDIA driver runs `provider: cuda`.
//!
//! `ferry runtime fetch --gpu` (or the first operator with `provider: cuda`) downloads the
//! `onnxruntime-gpu` wheel and NVIDIA's CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC,
//! nvJitLink and cuDNN 9 wheels (each checked against its SHA-256 in `pins.tsv`) and extracts
//! their shared libraries into `onnxruntime-gpu/VERSION/` under ferry's cache. Before that
//! ONNX Runtime is loaded, the NVIDIA libraries are loaded by path, so that the CUDA provider
//! finds them by name without `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::onnxruntime::ORT_VERSION;
use super::wheel::{self, WheelError};

/// CUDA settings of an operator (`cuda:` in its manifest, with `provider: cuda`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CudaOptions {
    /// The GPU to run on (as CUDA numbers them; default 0). Operators may share a GPU or be
    /// spread over several.
    #[serde(default)]
    pub device_id: u32,
    /// At most this many bytes for the provider's memory arena (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_limit: Option<u64>,
    /// How the arena grows: `next_power_of_two` (ONNX Runtime's default) or
    /// `same_as_requested` (less memory, more allocations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arena_extend_strategy: Option<ArenaExtend>,
    /// How cuDNN picks convolution algorithms: `exhaustive` (ONNX Runtime's default: benchmarks
    /// each shape once), `heuristic`, or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cudnn_conv_algo_search: Option<ConvSearch>,
    /// Let cuDNN use as much workspace as the fastest algorithm wants (default true in ONNX
    /// Runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cudnn_conv_use_max_workspace: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtend {
    NextPowerOfTwo,
    SameAsRequested,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConvSearch {
    Exhaustive,
    Heuristic,
    Default,
}

/// What happens when an operator asks for a GPU that cannot be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The operator does not load, and says why (so a job never runs 100x slower unnoticed).
    #[default]
    Error,
    /// Run on the CPU, with a warning.
    Cpu,
}

impl CudaOptions {
    /// The execution provider these options describe.
    pub fn provider(&self) -> ort::ep::CUDA {
        use ort::ep::ArenaExtendStrategy;
        use ort::ep::cuda::ConvAlgorithmSearch;
        let mut ep = ort::ep::CUDA::default().with_device_id(self.device_id as i32);
        if let Some(limit) = self.gpu_mem_limit {
            ep = ep.with_memory_limit(limit as usize);
        }
        if let Some(a) = self.arena_extend_strategy {
            ep = ep.with_arena_extend_strategy(match a {
                ArenaExtend::NextPowerOfTwo => ArenaExtendStrategy::NextPowerOfTwo,
                ArenaExtend::SameAsRequested => ArenaExtendStrategy::SameAsRequested,
            });
        }
        if let Some(s) = self.cudnn_conv_algo_search {
            ep = ep.with_conv_algorithm_search(match s {
                ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                ConvSearch::Default => ConvAlgorithmSearch::Default,
            });
        }
        if let Some(w) = self.cudnn_conv_use_max_workspace {
            ep = ep.with_conv_max_workspace(w);
        }
        ep
    }
}

/// The PyPI releases the CUDA build needs (CUDA 13, cuDNN 9), pinned like every download.
pub const GPU_RELEASES: &[&str] = &[
    "onnxruntime-gpu==1.31.1",
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cublas==13.10.0.20",
    "nvidia-cufft==12.5.0.14",
    "nvidia-curand==10.4.5.25",
    "nvidia-cuda-nvrtc==13.5.37",
    "nvidia-nvjitlink==13.5.37",
    "nvidia-cudnn-cu13==9.28.1.4",
];

/// Where the CUDA build lives in the cache: ONNX Runtime and its providers, with the NVIDIA
/// libraries in `nvidia/`.
pub fn gpu_dir() -> PathBuf {
    super::cache_dir().join("onnxruntime-gpu").join(ORT_VERSION)
}

fn gpu_library_path() -> PathBuf {
    gpu_dir().join(format!("libonnxruntime.so.{ORT_VERSION}"))
}

/// The CUDA build's runtime library, if it has been fetched.
pub fn cached_gpu_library() -> Option<PathBuf> {
    let lib = gpu_library_path();
    (lib.is_file() && gpu_dir().join("complete").is_file()).then_some(lib)
}

/// The CUDA build's runtime library, fetching it and the NVIDIA libraries on first use.
pub fn gpu_library() -> Result<PathBuf, WheelError> {
    if let Some(lib) = cached_gpu_library() {
        return Ok(lib);
    }
    fetch_gpu()?;
    Ok(gpu_library_path())
}

/// Downloads and extracts every wheel of [`GPU_RELEASES`] (about 1.5 GB of downloads). A
/// `complete` marker is written last, so an interrupted fetch is redone.
fn fetch_gpu() -> Result<(), WheelError> {
    let dir = gpu_dir();
    let nvidia = dir.join("nvidia");
    std::fs::create_dir_all(&nvidia).map_err(|source| WheelError::Io {
        path: nvidia.clone(),
        source,
    })?;
    let download = super::cache_dir()
        .join("tmp")
        .join(format!("onnxruntime-gpu-{}", std::process::id()));
    let result = (|| {
        for requirement in GPU_RELEASES {
            tracing::info!(%requirement, "fetching from PyPI (first use of CUDA only)");
            let whl = wheel::download(requirement, &download)?;
            if requirement.starts_with("onnxruntime-gpu") {
                // The runtime and the provider libraries it loads from its own directory.
                wheel::extract(&whl, &dir, |name| {
                    name.starts_with("onnxruntime/capi/libonnxruntime")
                })?;
            } else {
                wheel::extract(&whl, &nvidia, |name| {
                    name.starts_with("nvidia/") && name.contains("/lib/") && name.contains(".so")
                })?;
            }
            let _ = std::fs::remove_file(&whl);
        }
        wheel::write_atomically(&dir.join("complete"), GPU_RELEASES.join("\n").as_bytes())
    })();
    let _ = std::fs::remove_dir_all(&download);
    result
}

/// The directories whose NVIDIA libraries are loaded before ONNX Runtime: those in
/// `FERRY_CUDA_LIBS` (separated by `:`; a directory with `*/lib` folders, such as a Python
/// environment's `site-packages/nvidia`, stands for those folders), else the cache's.
pub fn library_dirs() -> Vec<PathBuf> {
    let Some(list) = std::env::var_os("FERRY_CUDA_LIBS").filter(|v| !v.is_empty()) else {
        let nvidia = gpu_dir().join("nvidia");
        return if nvidia.is_dir() {
            vec![nvidia]
        } else {
            vec![]
        };
    };
    let mut dirs = Vec::new();
    for dir in std::env::split_paths(&list) {
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path().join("lib")))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        libs.sort();
        if libs.is_empty() {
            dirs.push(dir);
        } else {
            dirs.extend(libs);
        }
    }
    dirs
}

/// What [`preload`] loaded, and what would not load (file name, reason).
#[derive(Debug, Default)]
pub struct Preloaded {
    pub loaded: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Loads the NVIDIA libraries in `dirs` by path, each after those it needs, so that the CUDA
/// provider's own loads by name find them. A library that will not load is reported, not
/// fatal: some need the driver's `libcuda.so.1`, which only a machine with a GPU has, and
/// whether the provider works is found out when a session is created.
pub fn preload(dirs: &[PathBuf]) -> Result<Preloaded, String> {
    let mut pending: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".so"))
            })
            .collect();
        libs.sort();
        pending.extend(libs);
    }
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let mut out = Preloaded::default();
    // A library loads once those it needs are loaded: repeat until a round loads nothing.
    loop {
        let before = out.loaded.len();
        let mut failed = Vec::new();
        for path in pending {
            // SAFETY: NVIDIA's libraries run no code on load that ferry depends on; they stay
            // loaded for the life of the process (leaked), as ONNX Runtime's CUDA provider
            // expects.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    std::mem::forget(lib);
                    out.loaded.push(name(&path));
                }
                Err(e) => {
                    let reason = std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), |s| s.to_string());
                    failed.push((path, reason));
                }
            }
        }
        if failed.is_empty() || out.loaded.len() == before {
            out.failed = failed.into_iter().map(|(p, r)| (name(&p), r)).collect();
            return Ok(out);
        }
        pending = failed.into_iter().map(|(p, _)| p).collect();
    }
}

/// The NVIDIA driver's version, from the kernel module (Linux), if one is loaded.
pub fn driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu ..."
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

/// The versions of the CUDA runtime and cuDNN the cached CUDA build uses (from the pinned
/// releases), when it has been fetched.
pub fn cached_versions() -> Option<(String, String)> {
    cached_gpu_library()?;
    let version = |project: &str| {
        GPU_RELEASES
            .iter()
            .find_map(|r| r.strip_prefix(project)?.strip_prefix("=="))
            .unwrap_or("?")
            .to_string()
    };
    Some((version("nvidia-cuda-runtime"), version("nvidia-cudnn-cu13")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_options_read_from_a_manifest() {
        let o: CudaOptions = crate::spec::yaml::from_str(
            "device_id: 1\ngpu_mem_limit: 8589934592\narena_extend_strategy: same_as_requested\ncudnn_conv_algo_search: heuristic\n",
        )
        .unwrap();
        assert_eq!(o.device_id, 1);
        assert_eq!(o.gpu_mem_limit, Some(8 << 30));
        assert_eq!(o.arena_extend_strategy, Some(ArenaExtend::SameAsRequested));
        assert_eq!(o.cudnn_conv_algo_search, Some(ConvSearch::Heuristic));
        assert!(crate::spec::yaml::from_str::<CudaOptions>("device: 1\n").is_err());
        assert_eq!(Fallback::default(), Fallback::Error);
    }

    #[test]
    fn every_gpu_release_is_pinned() {
        let pins = include_str!("pins.tsv");
        for r in GPU_RELEASES {
            let (name, version) = r.split_once("==").unwrap();
            let prefix = format!("{}-{version}-", name.replace('-', "_"));
            assert!(
                pins.lines().any(|l| l.starts_with(&prefix)),
                "{r} has no pinned wheel in pins.tsv"
            );
        }
    }

    #[test]
    fn preloading_reports_libraries_that_do_not_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libnot-a-library.so.1"), b"text").unwrap();
        let out = preload(&[dir.path().to_path_buf()]).unwrap();
        assert!(out.loaded.is_empty());
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].0, "libnot-a-library.so.1");
        assert!(!out.failed[0].1.is_empty());
        assert!(preload(&[dir.path().join("missing")]).is_err());
    }
}
