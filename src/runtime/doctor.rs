//! `ferry doctor`: what this machine has for running models, and which execution providers
//! actually run one (a one-node model is created and run on each).

use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::session::Session;
use ort::value::{Outlet, SymbolicDimensions, Tensor, TensorElementType, ValueType};

use super::cuda::{self, CudaOptions};
use super::onnxruntime::{self, ORT_VERSION};

/// One finding: what was checked and what was found.
#[derive(Debug, Clone)]
pub struct Finding {
    pub what: &'static str,
    pub found: String,
    /// Whether it is a problem for running models (on the providers the machine could use).
    pub ok: bool,
}

fn finding(what: &'static str, found: impl Into<String>, ok: bool) -> Finding {
    Finding {
        what,
        found: found.into(),
        ok,
    }
}

/// Checks the runtime libraries, the NVIDIA driver and the providers. Loads ONNX Runtime (the
/// CUDA build when it has been fetched), so it is meant for a process of its own.
pub fn check() -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(finding(
        "ferry",
        format!(
            "{} (ONNX Runtime {ORT_VERSION} expected)",
            env!("CARGO_PKG_VERSION")
        ),
        true,
    ));
    let ort_path = onnxruntime::ort_dylib_path();
    if let Some(p) = &ort_path {
        out.push(finding("ORT_DYLIB_PATH", p.display().to_string(), true));
    }
    let gpu = cuda::cached_gpu_library();
    out.push(finding(
        "CUDA build",
        match &gpu {
            Some(p) => format!("{} (cached)", p.display()),
            None => "not fetched (`ferry runtime fetch --gpu`, or the first `provider: cuda`)"
                .to_string(),
        },
        true,
    ));
    if let Some((cudart, cudnn)) = cuda::cached_versions() {
        out.push(finding(
            "CUDA runtime",
            format!("{cudart} (PyPI nvidia-cuda-runtime)"),
            true,
        ));
        out.push(finding(
            "cuDNN",
            format!("{cudnn} (PyPI nvidia-cudnn-cu13)"),
            true,
        ));
    }
    let driver = cuda::driver_version();
    out.push(finding(
        "NVIDIA driver",
        match &driver {
            Some(v) => v.clone(),
            None => "none (no NVIDIA kernel module is loaded)".to_string(),
        },
        true,
    ));
    if driver.is_some() {
        out.push(finding("GPUs", gpus(), true));
    }
    // With the CUDA build at hand, load it (the CPU provider runs on it too); the doctor
    // downloads nothing.
    let ort_path_set = ort_path.is_some();
    if gpu.is_some() || ort_path_set {
        onnxruntime::want_cuda();
    }
    match onnxruntime::library_in_use() {
        Ok(path) => out.push(finding("loaded", path.display().to_string(), true)),
        Err(e) => {
            out.push(finding("loaded", e.to_string(), false));
            return out;
        }
    }
    out.push(match run_identity(None) {
        Ok(()) => finding("provider cpu", "ok (ran a model)", true),
        Err(e) => finding("provider cpu", e, false),
    });
    if gpu.is_none() && !ort_path_set {
        out.push(finding(
            "provider cuda",
            "unavailable: the CUDA build is not fetched (`ferry runtime fetch --gpu`)",
            driver.is_none(),
        ));
        return out;
    }
    let cuda = run_identity(Some(&CudaOptions::default()));
    out.push(match cuda {
        Ok(()) => finding("provider cuda", "ok (ran a model on device 0)", true),
        // Only a problem where a GPU is there to be used.
        Err(e) => finding(
            "provider cuda",
            format!("unavailable: {e}"),
            driver.is_none(),
        ),
    });
    out
}

/// The GPUs `nvidia-smi -L` lists, when it is installed.
fn gpus() -> String {
    match std::process::Command::new("nvidia-smi").arg("-L").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .replace('\n', "; "),
        _ => "(nvidia-smi is not installed; the driver is enough for ferry)".to_string(),
    }
}

/// Creates and runs a one-node model (y = Identity(x)) on the CPU, or with CUDA.
pub fn run_identity(cuda: Option<&CudaOptions>) -> Result<(), String> {
    let env = onnxruntime::environment().map_err(|e| e.to_string())?;
    let mut builder = Session::builder(&env).map_err(|e| e.to_string())?;
    if let Some(options) = cuda {
        super::pool::register_cuda(&mut builder, options)?;
    }
    let mut session = identity_model()
        .and_then(|model| model.into_session(&builder))
        .map_err(|e| format!("creating a session: {e}"))?;
    let x = Tensor::from_array(([1usize], vec![42.0f32])).map_err(|e| e.to_string())?;
    let outputs = session
        .run(ort::inputs!["x" => x])
        .map_err(|e| format!("running: {e}"))?;
    let (_, y) = outputs["y"]
        .try_extract_tensor::<f32>()
        .map_err(|e| e.to_string())?;
    if y != [42.0] {
        return Err(format!("Identity(42) gave {y:?}"));
    }
    Ok(())
}

/// `y = Identity(x)`, x and y float tensors of shape [1], built with ONNX Runtime's model
/// editor.
fn identity_model() -> ort::Result<Model> {
    let float = || ValueType::Tensor {
        ty: TensorElementType::Float32,
        shape: vec![1i64].into(),
        dimension_symbols: SymbolicDimensions::empty(1),
    };
    let mut graph = Graph::new()?;
    graph.set_inputs([Outlet::new("x", float())])?;
    graph.set_outputs([Outlet::new("y", float())])?;
    graph.add_node(Node::new(
        "Identity",
        ONNX_DOMAIN,
        "identity",
        ["x"],
        ["y"],
        [],
    )?)?;
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 13)?])?;
    model.set_graph(graph)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doctor_runs_its_model_on_the_cpu() {
        run_identity(None).unwrap();
    }
}
