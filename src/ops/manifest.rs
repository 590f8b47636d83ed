//! Operator manifests: `operators/<name>.yaml`.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpError, TaskKind};
use crate::runtime::ExecutionProvider;
use crate::runtime::cuda::{CudaOptions, Fallback};
use crate::spec::locate::Locations;
use crate::spec::yaml::{self, Value};
use crate::spec::{Diagnostic, Diagnostics, deserialize_at};

/// An operator: a model directory run as a task, callable as a SQL function named `name`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The SQL function name and the name pipeline steps use: lowercase letters, digits and `_`.
    pub name: String,
    /// What the model does; decides pre- and post-processing and the output type.
    pub task: TaskKind,
    /// The model directory (a Hugging Face / Optimum ONNX export). A relative path is looked up
    /// under `FERRY_MODELS` (if set), then relative to this manifest's directory.
    pub model: PathBuf,
    /// The ONNX file inside the model directory.
    #[serde(default = "default_file")]
    pub file: String,
    /// Rows per inference call (default 32; 256 when the model runs on CUDA). Generation
    /// tasks: rows generating at once (continuous batching: a row that ends is replaced by a
    /// waiting one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// At most this much padded cost per inference call: items x the largest item's cost, in
    /// the task's unit (tokens for text tasks, pixels for image tasks; see `ferry operators`).
    /// Long texts and large images run in smaller calls, which bounds memory and is faster on
    /// CPU. Default: 1024 tokens for text tasks (16 times the default when the model runs on
    /// CUDA). Generation tasks: the KV cache positions the
    /// rows generating at once can come to hold (prompt and new tokens, every beam, padding
    /// included; default 16384), which bounds the cache's memory; Whisper the same, its
    /// 1500 source positions counted too, once per recording when its beams share them
    /// (default 32768; 131072 when every beam holds its own). `max_batch_tokens` is accepted
    /// as its old name.
    #[serde(
        default,
        alias = "max_batch_tokens",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_batch_cost: Option<usize>,
    /// Where the model runs: `cpu` or `cuda` (ONNX Runtime's CUDA build and the NVIDIA
    /// libraries it needs are fetched from PyPI on first use; a machine needs only the NVIDIA
    /// driver). When CUDA cannot be used, `fallback` decides.
    #[serde(default)]
    pub provider: ExecutionProvider,
    /// `provider: cuda` settings: `device_id`, `gpu_mem_limit` (bytes), `arena_extend_strategy`,
    /// `cudnn_conv_algo_search`, `cudnn_conv_use_max_workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaOptions>,
    /// When `provider: cuda` cannot be used (no CUDA build, no driver, no GPU): `error` (the
    /// default: the operator does not load and says why, so a job never runs many times slower
    /// unnoticed) or `cpu` (run on the CPU, with a warning).
    #[serde(default)]
    pub fallback: Fallback,
    /// Sessions running in parallel (default 1). More workers raise throughput on short texts
    /// and small models, at one session's memory each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// ONNX Runtime intra-op threads per session (default: the number of cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_per_worker: Option<usize>,
    /// Keep results on disk by input (the inference cache), so that a re-run over rows seen
    /// before reads their results instead of running the model. `true` keeps them in
    /// `inference/` under ferry's cache directory (`FERRY_CACHE`, else `~/.cache/ferry`);
    /// `{dir: PATH}` keeps them in PATH (relative to this manifest). Entries are keyed by the
    /// model's files, the task, its options and each row's argument values; `ferry cache stats`
    /// and `ferry cache clear` show and remove them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSetting>,
    /// Task options: see `EmbedOptions`, `ClassifyTextOptions`, `TagTokensOptions`, `AnswerOptions`, `ClassifyImageOptions`, `DetectOptions`, `SegmentOptions`, `EstimateDepthOptions`, `GenerationOptions` (generate, summarize, translate), `TranscribeOptions`, `ClassifyAudioOptions` and `DetectSpeechOptions` in this schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<TaskOptions>")]
    pub options: Option<Value>,
}

/// Where an operator's inference cache lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum CacheSetting {
    /// `true`: under ferry's cache directory; `false`: no cache.
    On(bool),
    /// A directory of its own.
    At {
        /// The cache directory (relative to the manifest).
        dir: PathBuf,
    },
}

/// The options of each task kind (documentation only: the manifest's `task` picks one).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum TaskOptions {
    Embed(super::embed::EmbedOptions),
    ClassifyText(super::classify_text::ClassifyTextOptions),
    TagTokens(super::tag_tokens::TagTokensOptions),
    Answer(super::answer::AnswerOptions),
    ClassifyImage(super::classify_image::ClassifyImageOptions),
    Detect(super::detect::DetectOptions),
    Segment(super::segment::SegmentOptions),
    EstimateDepth(super::estimate_depth::EstimateDepthOptions),
    Generation(super::generation::task::GenerationOptions),
    Transcribe(super::transcribe::TranscribeOptions),
    ClassifyAudio(super::classify_audio::ClassifyAudioOptions),
    DetectSpeech(super::detect_speech::DetectSpeechOptions),
}

fn default_file() -> String {
    "model.onnx".to_string()
}

/// `batch_size` when the manifest does not set it.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// `batch_size` when the manifest does not set it and the model runs on CUDA: a GPU is
/// under-used by calls sized for a CPU.
pub const GPU_BATCH_SIZE: usize = 256;
/// How many times the task's default `max_batch_cost` a call holds on CUDA.
pub const GPU_COST_SCALE: usize = 16;

/// A manifest with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedManifest {
    pub file: PathBuf,
    pub manifest: Manifest,
    pub locations: Locations,
}

impl LoadedManifest {
    /// Where the operator's sessions run.
    pub fn placement(&self) -> crate::runtime::onnxruntime::Placement {
        let m = &self.manifest;
        crate::runtime::onnxruntime::Placement {
            provider: m.provider,
            cuda: m.cuda.clone().unwrap_or_default(),
            fallback: m.fallback,
        }
    }

    /// The root of the operator's inference cache, when it has one.
    pub fn cache_root(&self) -> Option<PathBuf> {
        match self.manifest.cache.as_ref()? {
            CacheSetting::On(false) => None,
            CacheSetting::On(true) => Some(crate::runtime::cache_dir().join("inference")),
            CacheSetting::At { dir } if dir.is_absolute() => Some(dir.clone()),
            CacheSetting::At { dir } => {
                Some(self.file.parent().unwrap_or(Path::new(".")).join(dir))
            }
        }
    }

    /// Resolves `model:` to an existing directory, or says where it looked.
    pub fn model_dir(&self) -> Result<PathBuf, String> {
        let model = &self.manifest.model;
        if model.is_absolute() {
            return if model.is_dir() {
                Ok(model.clone())
            } else {
                Err(format!(
                    "{}: model directory {} not found (fix 'model:')",
                    self.file.display(),
                    model.display()
                ))
            };
        }
        let mut tried = Vec::new();
        if let Some(root) = std::env::var_os("FERRY_MODELS").filter(|v| !v.is_empty()) {
            tried.push(PathBuf::from(root).join(model));
        }
        tried.push(self.file.parent().unwrap_or(Path::new(".")).join(model));
        if let Some(found) = tried.iter().find(|p| p.is_dir()) {
            return Ok(found.clone());
        }
        Err(format!(
            "{}: model directory '{}' not found (looked in {}); fetch it (e.g. `ferry models fetch minilm`), set FERRY_MODELS, or fix 'model:'",
            self.file.display(),
            model.display(),
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// The task options, typed for the manifest's task.
    pub fn options<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, OpError> {
        match &self.manifest.options {
            None | Some(Value::Null) => Ok(T::default()),
            Some(v) => deserialize_at("options", v.clone()).map_err(|(path, message)| {
                let diagnostic = Diagnostic {
                    file: self.file.clone(),
                    position: self.locations.find(&path),
                    path,
                    message,
                };
                OpError::Options(diagnostic.to_string())
            }),
        }
    }
}

/// Reads every `*.yaml` / `*.yml` manifest in `dir`, reporting all problems at once.
pub fn load_manifests(dir: &Path) -> Result<Vec<LoadedManifest>, Diagnostics> {
    let diag =
        |file: &Path, locations: Option<&Locations>, path: &str, message: String| Diagnostic {
            file: file.to_path_buf(),
            position: locations.and_then(|l| l.find(path)),
            path: path.to_string(),
            message,
        };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Diagnostics(vec![diag(
            dir,
            None,
            "",
            format!("cannot read the operators directory: {e} (pass --operators DIR or set FERRY_OPERATORS)"),
        )])
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(diag(&file, None, "", format!("cannot read: {e}")));
                continue;
            }
        };
        let (value, locations) = match yaml::parse(&text) {
            Ok(parsed) => parsed,
            Err(e) => {
                let mut d = diag(&file, None, "", format!("invalid YAML: {}", e.message));
                d.position = e.position;
                problems.push(d);
                continue;
            }
        };
        match deserialize_at::<Manifest>("", value) {
            Ok(manifest) => {
                let valid_name = !manifest.name.is_empty()
                    && manifest
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && !manifest.name.starts_with(|c: char| c.is_ascii_digit());
                if !valid_name {
                    problems.push(diag(
                        &file,
                        Some(&locations),
                        "name",
                        format!(
                            "operator name '{}' must be lowercase letters, digits and _ (it becomes a SQL function name)",
                            manifest.name
                        ),
                    ));
                    continue;
                }
                if manifest.cuda.is_some() && manifest.provider != ExecutionProvider::Cuda {
                    problems.push(diag(
                        &file,
                        Some(&locations),
                        "cuda",
                        "cuda settings are given but the provider is cpu; add `provider: cuda`"
                            .into(),
                    ));
                    continue;
                }
                if manifest.batch_size == Some(0) {
                    problems.push(diag(
                        &file,
                        Some(&locations),
                        "batch_size",
                        "batch_size must be at least 1".into(),
                    ));
                    continue;
                }
                found.push(LoadedManifest {
                    file,
                    manifest,
                    locations,
                });
            }
            Err((path, message)) => {
                problems.push(diag(&file, Some(&locations), &path, message));
            }
        }
    }
    let mut seen = std::collections::HashMap::new();
    for m in &found {
        if let Some(other) = seen.insert(m.manifest.name.clone(), m.file.clone()) {
            problems.push(diag(
                &m.file,
                Some(&m.locations),
                "name",
                format!(
                    "operator '{}' is also defined in {}",
                    m.manifest.name,
                    other.display()
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(Diagnostics(problems))
    }
}
