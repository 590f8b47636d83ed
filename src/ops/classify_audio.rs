//! `classify_audio`: audio classification, as the `audio-classification` pipeline does it
//! (wav2vec2-style sequence classification over the whole recording).
//!
//! Output: `Struct<label: Utf8, score: Float64>` for the best label, or with `top_k`,
//! `List<Struct<label, score>>` sorted by score (ties keep label-id order). The pipeline
//! returns every label by default (`top_k` = the number of labels in transformers 4.57) and
//! always applies softmax unless told otherwise; ferry's default is the best label, as the
//! other classifiers'.

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::audio::AudioOptions;
use super::audio::model::{AudioModel, AudioTask, Clip};
use super::classify_text::{Ranking, ScoreFunction, classifier_labels};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of a `classify_audio` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyAudioOptions {
    /// Return the `top_k` best labels as a list instead of the single best label as a struct
    /// (more than the number of labels gives every label, the pipeline's default).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// `softmax` (the pipeline's default, whatever the model's problem type), `sigmoid` or
    /// `none`.
    #[serde(default)]
    pub function_to_apply: Option<ScoreFunction>,
    /// How recordings are read.
    #[serde(default)]
    pub audio: AudioOptions,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct ClassifyAudio {
    ranking: Ranking,
    output: [String; 1],
}

impl ClassifyAudio {
    pub fn resolve(
        options: &ClassifyAudioOptions,
        model: &ModelDir,
        audio: &AudioModel,
    ) -> Result<Self, OpError> {
        let (output, labels) = classifier_labels(model, &audio.outputs, "audio-classification")?;
        Ok(ClassifyAudio {
            ranking: Ranking {
                top_k: options.top_k.map(|k| k.min(labels.len())),
                function: options.function_to_apply.unwrap_or(ScoreFunction::Softmax),
                labels,
            },
            output: [output],
        })
    }
}

impl AudioTask for ClassifyAudio {
    /// (label id, score), best first.
    type Raw = Vec<(usize, f32)>;
    type Out = Vec<(usize, f32)>;

    fn output_type(&self) -> DataType {
        self.ranking.output_type()
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        clips: &[&Clip],
    ) -> Result<Vec<Self::Raw>, String> {
        self.ranking.rank(&outputs[0], clips.len())
    }

    fn finish(&self, mut raws: Vec<Self::Raw>) -> Result<Self::Out, String> {
        match (raws.pop(), raws.is_empty()) {
            (Some(r), true) => Ok(r),
            _ => Err("expected one result per recording".into()),
        }
    }

    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef> {
        self.ranking.to_array(&rows)
    }
}
