//! `segment`: semantic segmentation, as the `image-segmentation` pipeline does it for models
//! with `post_process_semantic_segmentation` (SegFormer, DPT/BEiT segmentation heads, ...):
//! the `logits` `[classes, h, w]` upsampled bilinearly (`align_corners=False`) to the image's
//! size, the argmax per pixel, then one mask per label present, in ascending label order.
//!
//! Output: `List<Struct<label: Utf8, score: Float64, mask: Binary>>`; `score` is null, as the
//! pipeline's is for semantic segmentation; `mask` is a PNG (8-bit grayscale, 255 where the
//! pixel has the label, else 0) of the original image's size.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BinaryBuilder, Float64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::core::struct_column;
use super::image::processor::PixelValues;
use super::image::resample::bilinear_argmax;
use super::image::{ImageModel, ImageOptions, ImageTask, encode_png};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of a `segment` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentOptions {
    /// How images are read and preprocessed.
    #[serde(default)]
    pub image: ImageOptions,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct Segment {
    labels: Vec<String>,
    output: [String; 1],
}

/// One label's region of an image.
#[derive(Debug, Clone)]
pub struct Region {
    pub label: usize,
    /// PNG of the mask.
    pub mask: Vec<u8>,
}

impl Segment {
    pub fn resolve(
        _options: &SegmentOptions,
        model: &ModelDir,
        image: &ImageModel,
    ) -> Result<Self, OpError> {
        let info = image
            .outputs
            .iter()
            .find(|o| o.name == "logits")
            .ok_or_else(|| {
                OpError::Model(format!(
                    "{}: no 'logits' output; export the model with task semantic-segmentation",
                    model.onnx.display()
                ))
            })?;
        if info.shape.len() != 4 {
            return Err(OpError::Model(format!(
                "{}: 'logits' has shape {:?}; semantic segmentation outputs [batch, classes, height, width] (instance and panoptic exports are not supported yet)",
                model.onnx.display(),
                info.shape
            )));
        }
        let labels = model.config.labels();
        if labels.is_empty() || (info.shape[1] > 0 && info.shape[1] as usize != labels.len()) {
            return Err(OpError::Model(format!(
                "{}: config.json names {} labels but the model outputs {} classes",
                model.dir.display(),
                labels.len(),
                info.shape[1]
            )));
        }
        Ok(Segment {
            labels,
            output: ["logits".to_string()],
        })
    }

    fn fields() -> Fields {
        Fields::from(vec![
            Field::new("label", DataType::Utf8, false),
            Field::new("score", DataType::Float64, true),
            Field::new("mask", DataType::Binary, false),
        ])
    }
}

/// One image's logits, taken from the call's output.
#[derive(Debug)]
pub struct Logits {
    data: Vec<f32>,
    height: usize,
    width: usize,
    original: (usize, usize),
}

impl ImageTask for Segment {
    type Raw = Logits;
    type Out = Vec<Region>;

    fn output_type(&self) -> DataType {
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(Self::fields()),
            true,
        )))
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        pictures: &[&PixelValues],
    ) -> Result<Vec<Logits>, String> {
        let classes = self.labels.len();
        let logits = &outputs[0];
        logits.expect_shape(&[pictures.len(), classes, usize::MAX, usize::MAX])?;
        let (height, width) = (logits.shape[2] as usize, logits.shape[3] as usize);
        let per = classes * height * width;
        Ok(pictures
            .iter()
            .enumerate()
            .map(|(i, pic)| Logits {
                data: logits.data[i * per..(i + 1) * per].to_vec(),
                height,
                width,
                original: pic.original,
            })
            .collect())
    }

    fn finish(&self, raw: Logits) -> Result<Vec<Region>, String> {
        let classes = self.labels.len();
        let (oh, ow) = raw.original;
        let map = bilinear_argmax(&raw.data, classes, raw.height, raw.width, oh, ow);
        let mut present = vec![false; classes];
        for &l in &map {
            present[l as usize] = true;
        }
        let mut regions = Vec::new();
        for (label, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            let mask: Vec<u8> = map
                .iter()
                .map(|&l| if l as usize == label { 255 } else { 0 })
                .collect();
            regions.push(Region {
                label,
                mask: encode_png(ow, oh, 1, &mask)?,
            });
        }
        Ok(regions)
    }

    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef> {
        struct_column(Self::fields(), &rows, false, |b, r| {
            b.field_builder::<StringBuilder>(0)
                .expect("label")
                .append_value(&self.labels[r.label]);
            b.field_builder::<Float64Builder>(1)
                .expect("score")
                .append_null();
            b.field_builder::<BinaryBuilder>(2)
                .expect("mask")
                .append_value(&r.mask);
        })
    }
}
