//! `classify_text`: text classification, as the `text-classification` pipeline does it.
//!
//! Output: `Struct<label: Utf8, score: Float64>` for the best label, or with `top_k`,
//! `List<Struct<label, score>>` sorted by score (ties keep label-id order).

use datafusion::arrow::array::{ArrayRef, Float64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use crate::runtime::tensor::Output;
use tokenizers::Encoding;

use super::core::list_of_structs;
use super::text::{
    Encoded, TensorView, TextInput, TextModel, TextTask, Truncating, only_window, struct_column,
};
use crate::runtime::ModelDir;
use crate::runtime::model_dir::ModelConfig;
use crate::runtime::pool::TensorInfo;

/// Options of a `classify_text` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyTextOptions {
    /// Return the `top_k` best labels as a list instead of the single best label as a struct.
    /// Set it to the number of labels for every label's score.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// `softmax`, `sigmoid` or `none`. Default as transformers decides it: sigmoid for
    /// `multi_label_classification` or a single label, softmax otherwise.
    #[serde(default)]
    pub function_to_apply: Option<ScoreFunction>,
    /// Truncate texts to this many tokens (at most the model's own limit). transformers'
    /// pipeline fails on texts longer than the model; ferry truncates them.
    #[serde(default)]
    pub max_length: Option<usize>,
}

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
    None,
}

/// A classifier head's labels and how its logits become ranked labels: what the classify
/// tasks (text, image, audio) share.
#[derive(Debug)]
pub struct Ranking {
    pub labels: Vec<String>,
    pub function: ScoreFunction,
    /// A list of the `top_k` best labels; None: the best label as a struct.
    pub top_k: Option<usize>,
}

impl Ranking {
    pub fn output_type(&self) -> DataType {
        label_output_type(self.top_k)
    }

    /// Each row's ranked labels from `rows` x labels logits.
    pub fn rank(&self, logits: &Output<'_>, rows: usize) -> Result<Vec<Vec<(usize, f32)>>, String> {
        let n = self.labels.len();
        logits.expect_shape(&[rows, n])?;
        Ok(logits
            .data
            .chunks(n)
            .map(|l| self.function.ranked(l, self.top_k.unwrap_or(1)))
            .collect())
    }

    pub fn to_array(&self, rows: &[Option<Vec<(usize, f32)>>]) -> Result<ArrayRef> {
        label_scores(&self.labels, rows, self.top_k.is_none())
    }
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct ClassifyText {
    ranking: Ranking,
    /// The one model output read: `["logits"]`.
    output: [String; 1],
    encoder: Truncating,
}

impl ClassifyText {
    pub fn resolve(
        options: &ClassifyTextOptions,
        model: &ModelDir,
        text: &TextModel,
    ) -> Result<Self, OpError> {
        let outputs = &text.outputs;
        let encoder = text.truncating(options.max_length)?;
        let (output, labels) = classifier_labels(model, outputs, "text-classification")?;
        let function = options
            .function_to_apply
            .unwrap_or_else(|| default_function(&model.config, labels.len(), true));
        Ok(ClassifyText {
            ranking: Ranking {
                labels,
                function,
                top_k: options.top_k,
            },
            output: [output],
            encoder,
        })
    }
}

/// A classifier's scores output (`logits`, or a model's only output) and its labels:
/// config.json's `id2label`, checked against the output's width (`LABEL_i` names when the
/// config has none).
pub fn classifier_labels(
    model: &ModelDir,
    outputs: &[TensorInfo],
    export_task: &str,
) -> Result<(String, Vec<String>), OpError> {
    let only = match outputs {
        [one] => Some(one),
        _ => None,
    };
    let info = outputs
        .iter()
        .find(|o| o.name == "logits")
        .or(only)
        .ok_or_else(|| {
            OpError::Model(format!(
                "{}: no 'logits' output (has {}); export the model with task {export_task}",
                model.onnx.display(),
                outputs
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let mut labels = model.config.labels();
    let width = info.shape.last().copied().unwrap_or(-1);
    if width > 0 {
        let width = width as usize;
        if labels.is_empty() {
            labels = (0..width).map(|i| format!("LABEL_{i}")).collect();
        } else if labels.len() != width {
            return Err(OpError::Model(format!(
                "{}: config.json names {} labels but the model outputs {width} logits",
                model.dir.display(),
                labels.len()
            )));
        }
    }
    if labels.is_empty() {
        return Err(OpError::Model(format!(
            "{}: cannot tell the labels: config.json has no id2label and the logits width is dynamic",
            model.dir.display()
        )));
    }
    Ok((info.name.clone(), labels))
}

/// `function_to_apply` as the classification pipelines decide it; text-classification has a
/// `regression` branch (no function), image-classification does not.
pub fn default_function(cfg: &ModelConfig, labels: usize, regression: bool) -> ScoreFunction {
    match cfg.problem_type.as_deref() {
        Some("regression") if regression => ScoreFunction::None,
        Some("multi_label_classification") => ScoreFunction::Sigmoid,
        _ if labels == 1 => ScoreFunction::Sigmoid,
        Some("single_label_classification") => ScoreFunction::Softmax,
        _ if labels > 1 => ScoreFunction::Softmax,
        _ => match cfg.function_to_apply.as_deref() {
            Some("sigmoid") => ScoreFunction::Sigmoid,
            Some("softmax") => ScoreFunction::Softmax,
            _ => ScoreFunction::None,
        },
    }
}

/// `Struct<label, score>` of each row's best label, or with `first_only` false the list of
/// its ranked labels.
pub fn label_scores(
    labels: &[String],
    rows: &[Option<Vec<(usize, f32)>>],
    first_only: bool,
) -> Result<ArrayRef> {
    struct_column(label_fields(), rows, first_only, |b, &(id, score)| {
        b.field_builder::<StringBuilder>(0)
            .expect("label")
            .append_value(&labels[id]);
        b.field_builder::<Float64Builder>(1)
            .expect("score")
            .append_value(score as f64);
    })
}

/// `Struct<label, score>` for the best label, or with `top_k` the list of them.
pub fn label_output_type(top_k: Option<usize>) -> DataType {
    match top_k {
        Some(_) => list_of_structs(label_fields()),
        None => DataType::Struct(label_fields()),
    }
}

/// The fields of a label and its score.
pub fn label_fields() -> Fields {
    Fields::from(vec![
        Field::new("label", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
    ])
}

impl ScoreFunction {
    /// The pipelines' softmax (max subtracted first), sigmoid or identity, in f32.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            ScoreFunction::None => logits.to_vec(),
            ScoreFunction::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            ScoreFunction::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                exps.iter().map(|e| e / sum).collect()
            }
        }
    }

    /// (label id, score) best first, `top_k` of them; equal scores keep label-id order, as
    /// Python's stable sort does.
    pub fn ranked(self, logits: &[f32], top_k: usize) -> Vec<(usize, f32)> {
        let mut ranked: Vec<(usize, f32)> = self.apply(logits).into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.truncate(top_k.max(1));
        ranked
    }
}

impl TextTask for ClassifyText {
    /// (label id, score), best first; one entry unless `top_k` is set.
    type Window = Vec<(usize, f32)>;
    type Row = Vec<(usize, f32)>;

    fn output_type(&self) -> DataType {
        self.ranking.output_type()
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn encode(&self, input: &TextInput) -> Result<Vec<Encoding>, String> {
        self.encoder.encode(input, false)
    }

    fn finish(&self, _input: &TextInput, windows: Vec<Self::Window>) -> Result<Self::Row, String> {
        only_window(windows)
    }

    fn postprocess(
        &self,
        outputs: &[TensorView<'_>],
        enc: &Encoded,
        _windows: &[&Encoding],
    ) -> Result<Vec<Self::Window>, String> {
        self.ranking.rank(&outputs[0], enc.rows)
    }

    fn to_array(&self, rows: Vec<Option<Self::Row>>) -> Result<ArrayRef> {
        self.ranking.to_array(&rows)
    }
}
