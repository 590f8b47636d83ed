//! `classify_image`: image classification, as the `image-classification` pipeline does it.
//!
//! Output: `Struct<label: Utf8, score: Float64>` for the best label, or with `top_k`,
//! `List<Struct<label, score>>` sorted by score (ties keep label-id order). The pipeline's own
//! default is a list of 5; ferry's default matches `classify_text` (the best label), and
//! `top_k: 5` gives the pipeline's list.

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::classify_text::{Ranking, ScoreFunction, classifier_labels, default_function};
use super::image::processor::PixelValues;
use super::image::{ImageModel, ImageOptions, ImageTask};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of a `classify_image` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyImageOptions {
    /// Return the `top_k` best labels as a list instead of the single best label as a struct
    /// (the pipeline's default is 5; more than the number of labels gives every label).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// `softmax`, `sigmoid` or `none`. Default as transformers decides it: sigmoid for
    /// `multi_label_classification` or a single label, softmax otherwise.
    #[serde(default)]
    pub function_to_apply: Option<ScoreFunction>,
    /// How images are read and preprocessed.
    #[serde(default)]
    pub image: ImageOptions,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct ClassifyImage {
    ranking: Ranking,
    output: [String; 1],
}

impl ClassifyImage {
    pub fn resolve(
        options: &ClassifyImageOptions,
        model: &ModelDir,
        image: &ImageModel,
    ) -> Result<Self, OpError> {
        let (output, labels) = classifier_labels(model, &image.outputs, "image-classification")?;
        let function = options
            .function_to_apply
            .unwrap_or_else(|| default_function(&model.config, labels.len(), false));
        Ok(ClassifyImage {
            ranking: Ranking {
                top_k: options.top_k.map(|k| k.min(labels.len())),
                labels,
                function,
            },
            output: [output],
        })
    }
}

impl ImageTask for ClassifyImage {
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
        pictures: &[&PixelValues],
    ) -> Result<Vec<Self::Raw>, String> {
        self.ranking.rank(&outputs[0], pictures.len())
    }

    fn finish(&self, raw: Self::Raw) -> Result<Self::Out, String> {
        Ok(raw)
    }

    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef> {
        self.ranking.to_array(&rows)
    }
}
