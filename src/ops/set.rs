//! The operators a run uses, built on first use.

use std::collections::HashMap;

use super::{LoadedManifest, Operator};

/// Operators built so far, by name; each model is loaded once per process.
#[derive(Default)]
pub struct OperatorSet {
    manifests: Vec<LoadedManifest>,
    built: HashMap<String, Operator>,
}

impl OperatorSet {
    pub fn new(manifests: Vec<LoadedManifest>) -> Self {
        OperatorSet {
            manifests,
            built: HashMap::new(),
        }
    }

    pub fn manifests(&self) -> &[LoadedManifest] {
        &self.manifests
    }

    pub fn names(&self) -> Vec<&str> {
        self.manifests
            .iter()
            .map(|m| m.manifest.name.as_str())
            .collect()
    }

    /// Says which operators are about to be used, before any is built: if one runs on CUDA,
    /// ONNX Runtime's CUDA build is the library loaded (it must be chosen before the first
    /// session is created).
    pub fn will_use<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            if let Some(m) = self.manifests.iter().find(|m| m.manifest.name == name) {
                announce(m);
            }
        }
    }

    /// The operator `name`, loading its model on first use.
    pub fn get(&mut self, name: &str) -> Result<&Operator, String> {
        if !self.built.contains_key(name) {
            let manifest = self
                .manifests
                .iter()
                .find(|m| m.manifest.name == name)
                .ok_or_else(|| {
                    format!(
                        "unknown operator '{name}' (known: {})",
                        if self.manifests.is_empty() {
                            "none".to_string()
                        } else {
                            self.names().join(", ")
                        }
                    )
                })?;
            announce(manifest);
            let op = super::build(manifest).map_err(|e| format!("operator '{name}': {e}"))?;
            self.built.insert(name.to_string(), op);
        }
        Ok(&self.built[name])
    }

    /// The operator `name` if it is built already.
    pub fn built_get(&self, name: &str) -> Option<&Operator> {
        self.built.get(name)
    }

    pub fn built(&self) -> impl Iterator<Item = &Operator> {
        self.built.values()
    }
}

/// Asks for ONNX Runtime's CUDA build if `m` runs on CUDA (it must be chosen before the first
/// session is created).
fn announce(m: &LoadedManifest) {
    if m.manifest.provider == crate::runtime::ExecutionProvider::Cuda {
        crate::runtime::onnxruntime::want_cuda();
    }
}
