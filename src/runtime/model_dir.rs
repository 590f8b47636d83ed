//! A model directory as Hugging Face / Optimum export it: `model.onnx`, `config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, and for
//! sentence-transformers models `modules.json` and `1_Pooling/config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokenizers::Tokenizer;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model directory {dir} not found{hint}")]
    MissingDir { dir: PathBuf, hint: String },
    #[error(
        "model file '{file}' not found in {dir} (set 'file:' in the manifest to the .onnx file's name)"
    )]
    MissingModelFile { dir: PathBuf, file: String },
    #[error(
        "{file} not found in {dir}: the {task} task needs it (export the model with optimum so that it is copied beside model.onnx)"
    )]
    MissingFile {
        dir: PathBuf,
        file: &'static str,
        task: &'static str,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The fields of `config.json` ferry reads. Everything else is ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    #[serde(default)]
    pub problem_type: Option<String>,
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub function_to_apply: Option<String>,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
}

impl ModelConfig {
    /// Labels in id order. Missing ids get `LABEL_<id>` as transformers names them.
    pub fn labels(&self) -> Vec<String> {
        let n = self
            .id2label
            .keys()
            .filter_map(|k| k.parse::<usize>().ok())
            .map(|k| k + 1)
            .max()
            .unwrap_or(0)
            .max(self.num_labels.unwrap_or(0));
        (0..n)
            .map(|i| {
                self.id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    pad_token: Option<serde_json::Value>,
}

/// sentence-transformers' `1_Pooling/config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PoolingConfig {
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct StModule {
    #[serde(rename = "type")]
    kind: String,
}

/// A resolved model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub onnx: PathBuf,
    pub config: ModelConfig,
}

impl ModelDir {
    /// Opens `dir`, checking that the ONNX file is there.
    pub fn open(dir: &Path, file: &str) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingDir {
                dir: dir.to_path_buf(),
                hint: String::new(),
            });
        }
        let dir = &std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let onnx = dir.join(file);
        if !onnx.is_file() {
            return Err(ModelError::MissingModelFile {
                dir: dir.to_path_buf(),
                file: file.to_string(),
            });
        }
        let config = read_json::<ModelConfig>(&dir.join("config.json"))?.unwrap_or_default();
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            onnx,
            config,
        })
    }

    /// A short content hash of the ONNX file, for lineage and `ferry operators`.
    pub fn hash(&self) -> Result<String, ModelError> {
        let bytes = std::fs::read(&self.onnx).map_err(|source| ModelError::Io {
            path: self.onnx.clone(),
            source,
        })?;
        Ok(hex::encode(&Sha256::digest(&bytes)[..8]))
    }

    /// Loads `tokenizer.json` with its own padding and truncation turned off: the operator applies
    /// the pipeline's rules instead (see PIPELINES.md, rule 0).
    pub fn tokenizer(&self, task: &'static str) -> Result<Tokenizer, ModelError> {
        let path = self.dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                dir: self.dir.clone(),
                file: "tokenizer.json",
                task,
            });
        }
        let mut tok = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path,
                message: e.to_string(),
            })?;
        Ok(tok)
    }

    /// The longest input the model takes: sentence-transformers' `max_seq_length`, else
    /// `model_max_length` of tokenizer_config.json (ignoring the "unset" sentinel values), else
    /// `max_position_embeddings`, else 512.
    pub fn max_length(&self) -> Result<usize, ModelError> {
        #[derive(Deserialize)]
        struct StConfig {
            max_seq_length: Option<usize>,
        }
        if let Some(n) = read_json::<StConfig>(&self.dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.max_seq_length)
        {
            return Ok(n);
        }
        let tc = read_json::<TokenizerConfig>(&self.dir.join("tokenizer_config.json"))?;
        let from_tokenizer = tc
            .and_then(|t| t.model_max_length)
            .filter(|&m| m > 0.0 && m < 1e9)
            .map(|m| m as usize);
        Ok(from_tokenizer
            .or(self.config.max_position_embeddings)
            .unwrap_or(512))
    }

    /// The id used to pad input_ids.
    pub fn pad_id(&self, tokenizer: &Tokenizer) -> Result<u32, ModelError> {
        let tc = read_json::<TokenizerConfig>(&self.dir.join("tokenizer_config.json"))?;
        let named = tc.and_then(|t| t.pad_token).and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(m) => {
                m.get("content").and_then(|c| c.as_str().map(String::from))
            }
            _ => None,
        });
        Ok(named
            .and_then(|t| tokenizer.token_to_id(&t))
            .or(self.config.pad_token_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0))
    }

    /// sentence-transformers' pooling settings, when the directory has them.
    pub fn pooling_config(&self) -> Result<Option<PoolingConfig>, ModelError> {
        read_json(&self.dir.join("1_Pooling").join("config.json"))
    }

    /// Whether sentence-transformers' `modules.json` ends in a Normalize module.
    pub fn st_normalizes(&self) -> Result<Option<bool>, ModelError> {
        Ok(read_json::<Vec<StModule>>(&self.dir.join("modules.json"))?
            .map(|mods| mods.iter().any(|m| m.kind.ends_with("Normalize"))))
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ModelError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
