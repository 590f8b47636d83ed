//! `segment`: image segmentation, as the `image-segmentation` pipeline does it.
//!
//! - Semantic (SegFormer, DPT/BEiT segmentation heads; one `logits` output `[classes, h, w]`):
//!   the logits upsampled bilinearly (`align_corners=False`) to the image's size, the argmax per
//!   pixel, one mask per label present, in ascending label order, with a null score.
//! - Panoptic (DETR-style `logits` `[queries, classes + 1]` and `pred_masks` `[queries, h, w]`),
//!   as `post_process_panoptic_segmentation`: softmax over every class including no-object,
//!   queries kept when their class is real and their score `> threshold`; their sigmoid masks
//!   upsampled, weighted by score, each pixel to its best query; a query is a segment when it
//!   owns pixels, its own mask has pixels `>= mask_threshold`, and the first over the second is
//!   `> overlap_mask_area_threshold`. Score rounded to 6 digits, as the pipeline's.
//!
//! The upsampled planes are never held: each pixel's values are interpolated and reduced on
//! the spot, so a segment map of a large picture costs one label per pixel.
//!
//! Output: `List<Struct<label: Utf8, score: Float64, mask: Binary>>`, `mask` a PNG (8-bit
//! grayscale, 255 inside, 0 outside) of the original image's size.

use datafusion::arrow::array::{ArrayRef, BinaryBuilder, Float64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::core::{list_of_structs, struct_column};
use super::image::processor::PixelValues;
use super::image::resample::{bilinear_argmax, linear_taps};
use super::image::{ImageModel, ImageOptions, ImageTask, encode_png};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of a `segment` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentOptions {
    /// Panoptic models: keep queries scoring more than this (default 0.9, the pipeline's).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Panoptic models: a query's own mask is its pixels at or over this probability (0.5).
    #[serde(default)]
    pub mask_threshold: Option<f64>,
    /// Panoptic models: a query is a segment when the pixels it wins are more than this share
    /// of its own mask (default 0.5, the pipeline's).
    #[serde(default)]
    pub overlap_mask_area_threshold: Option<f64>,
    /// How images are read and preprocessed.
    #[serde(default)]
    pub image: ImageOptions,
}

/// How the model segments.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Semantic,
    Panoptic {
        threshold: f32,
        mask_threshold: f32,
        overlap: f64,
    },
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct Segment {
    labels: Vec<String>,
    mode: Mode,
    outputs: Vec<String>,
}

/// One segment of an image.
#[derive(Debug, Clone)]
pub struct Region {
    pub label: usize,
    pub score: Option<f64>,
    /// PNG of the mask.
    pub mask: Vec<u8>,
}

/// What the worker takes of one image's outputs.
#[derive(Debug)]
pub enum Raw {
    /// `[classes, h, w]` logits.
    Semantic {
        logits: Vec<f32>,
        height: usize,
        width: usize,
        original: (usize, usize),
    },
    /// `[queries, classes + 1]` class logits and `[queries, h, w]` mask logits.
    Panoptic {
        classes: Vec<f32>,
        masks: Vec<f32>,
        height: usize,
        width: usize,
        original: (usize, usize),
    },
}

impl Segment {
    pub fn resolve(
        options: &SegmentOptions,
        model: &ModelDir,
        image: &ImageModel,
    ) -> Result<Self, OpError> {
        let output = |name: &str| image.outputs.iter().find(|o| o.name == name);
        let logits = output("logits").ok_or_else(|| {
            OpError::Model(format!(
                "{}: no 'logits' output; export the model with task semantic-segmentation or image-segmentation",
                model.onnx.display()
            ))
        })?;
        let labels = model.config.labels();
        let (mode, outputs, classes) = match (logits.shape.len(), output("pred_masks")) {
            (4, _) => (Mode::Semantic, vec!["logits".to_string()], logits.shape[1]),
            (3, Some(_)) => (
                Mode::Panoptic {
                    threshold: options.threshold.unwrap_or(0.9) as f32,
                    mask_threshold: options.mask_threshold.unwrap_or(0.5) as f32,
                    overlap: options.overlap_mask_area_threshold.unwrap_or(0.5),
                },
                vec!["logits".to_string(), "pred_masks".to_string()],
                // The last class is "no object".
                logits.shape[2] - 1,
            ),
            _ => {
                return Err(OpError::Model(format!(
                    "{}: 'logits' has shape {:?}; ferry segments with semantic models ([batch, classes, height, width]) and DETR-style panoptic models (logits [batch, queries, classes + 1] with pred_masks)",
                    model.onnx.display(),
                    logits.shape
                )));
            }
        };
        if labels.is_empty() || (classes > 0 && classes as usize != labels.len()) {
            return Err(OpError::Model(format!(
                "{}: config.json names {} labels but the model outputs {classes} classes",
                model.dir.display(),
                labels.len(),
            )));
        }
        Ok(Segment {
            labels,
            mode,
            outputs,
        })
    }

    fn fields() -> Fields {
        Fields::from(vec![
            Field::new("label", DataType::Utf8, false),
            Field::new("score", DataType::Float64, true),
            Field::new("mask", DataType::Binary, false),
        ])
    }

    /// One PNG mask per value of `map` that `keep` names, in `keep`'s order.
    fn masks(
        map: &[u16],
        (height, width): (usize, usize),
        keep: &[(u16, usize, Option<f64>)],
    ) -> Result<Vec<Region>, String> {
        keep.iter()
            .map(|&(value, label, score)| {
                let mask: Vec<u8> = map
                    .iter()
                    .map(|&v| if v == value { 255 } else { 0 })
                    .collect();
                Ok(Region {
                    label,
                    score,
                    mask: encode_png(width, height, 1, &mask)?,
                })
            })
            .collect()
    }

    fn panoptic(
        &self,
        classes: &[f32],
        masks: &[f32],
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        (threshold, mask_threshold, overlap): (f32, f32, f64),
    ) -> Result<Vec<Region>, String> {
        let n_classes = self.labels.len() + 1;
        let queries = classes.len() / n_classes;
        // Softmax over every class, no-object included; the best (first on ties).
        let mut kept: Vec<(usize, usize, f32)> = Vec::new();
        for q in 0..queries {
            let row = &classes[q * n_classes..(q + 1) * n_classes];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let (label, score) = exps.iter().map(|e| e / sum).enumerate().fold(
                (0, f32::NEG_INFINITY),
                |best, (j, p)| {
                    if p > best.1 { (j, p) } else { best }
                },
            );
            if label != n_classes - 1 && score > threshold {
                kept.push((q, label, score));
            }
        }
        if kept.is_empty() {
            return Ok(Vec::new());
        }
        let plane = h * w;
        let probs: Vec<f32> = kept
            .iter()
            .flat_map(|&(q, _, _)| {
                masks[q * plane..(q + 1) * plane]
                    .iter()
                    .map(|&x| 1.0 / (1.0 + (-x).exp()))
            })
            .collect();
        let scores: Vec<f32> = kept.iter().map(|k| k.2).collect();
        let (map, own_area) = weighted_argmax(&probs, &scores, h, w, oh, ow, mask_threshold);
        let mut won = vec![0u64; kept.len()];
        for &k in &map {
            won[k as usize] += 1;
        }
        let mut segments = Vec::new();
        for (k, &(_, label, score)) in kept.iter().enumerate() {
            if won[k] > 0 && own_area[k] > 0 && won[k] as f64 / own_area[k] as f64 > overlap {
                let rounded = (score as f64 * 1e6).round_ties_even() / 1e6;
                segments.push((k as u16, label, Some(rounded)));
            }
        }
        Self::masks(&map, (oh, ow), &segments)
    }
}

/// For score-weighted, bilinearly upsampled mask probabilities (`planes` of `h x w`, upsampled
/// to `oh x ow`): each pixel's best plane (first on ties), and each plane's count of pixels at or
/// over `mask_threshold` (compared after weighting, as transformers does).
fn weighted_argmax(
    probs: &[f32],
    scores: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    mask_threshold: f32,
) -> (Vec<u16>, Vec<u64>) {
    let planes = scores.len();
    let plane = h * w;
    let xs: Vec<_> = (0..ow)
        .map(|x| linear_taps(x, w as f32 / ow as f32, w))
        .collect();
    let mut map = vec![0u16; oh * ow];
    let mut own = vec![0u64; planes];
    for y in 0..oh {
        let (y0, y1, h0, h1) = linear_taps(y, h as f32 / oh as f32, h);
        for (x, &(x0, x1, w0, w1)) in xs.iter().enumerate() {
            let mut best = (0u16, f32::NEG_INFINITY);
            for (p, &score) in scores.iter().enumerate() {
                let src = &probs[p * plane..(p + 1) * plane];
                let v = h0 * (w0 * src[y0 * w + x0] + w1 * src[y0 * w + x1])
                    + h1 * (w0 * src[y1 * w + x0] + w1 * src[y1 * w + x1]);
                let v = v * score;
                if v >= mask_threshold {
                    own[p] += 1;
                }
                if v > best.1 {
                    best = (p as u16, v);
                }
            }
            map[y * ow + x] = best.0;
        }
    }
    (map, own)
}

impl ImageTask for Segment {
    type Raw = Raw;
    type Out = Vec<Region>;

    fn output_type(&self) -> DataType {
        list_of_structs(Self::fields())
    }

    fn outputs(&self) -> &[String] {
        &self.outputs
    }

    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        pictures: &[&PixelValues],
    ) -> Result<Vec<Raw>, String> {
        let n = pictures.len();
        match self.mode {
            Mode::Semantic => {
                let logits = &outputs[0];
                logits.expect_shape(&[n, self.labels.len(), usize::MAX, usize::MAX])?;
                let (height, width) = (logits.shape[2] as usize, logits.shape[3] as usize);
                let per = self.labels.len() * height * width;
                Ok(pictures
                    .iter()
                    .enumerate()
                    .map(|(i, pic)| Raw::Semantic {
                        logits: logits.data[i * per..(i + 1) * per].to_vec(),
                        height,
                        width,
                        original: pic.original,
                    })
                    .collect())
            }
            Mode::Panoptic { .. } => {
                let (classes, masks) = (&outputs[0], &outputs[1]);
                classes.expect_shape(&[n, usize::MAX, self.labels.len() + 1])?;
                let queries = classes.shape[1] as usize;
                masks.expect_shape(&[n, queries, usize::MAX, usize::MAX])?;
                let (height, width) = (masks.shape[2] as usize, masks.shape[3] as usize);
                let (per_c, per_m) = (queries * (self.labels.len() + 1), queries * height * width);
                Ok(pictures
                    .iter()
                    .enumerate()
                    .map(|(i, pic)| Raw::Panoptic {
                        classes: classes.data[i * per_c..(i + 1) * per_c].to_vec(),
                        masks: masks.data[i * per_m..(i + 1) * per_m].to_vec(),
                        height,
                        width,
                        original: pic.original,
                    })
                    .collect())
            }
        }
    }

    fn finish(&self, raw: Raw) -> Result<Vec<Region>, String> {
        match (raw, self.mode) {
            (
                Raw::Semantic {
                    logits,
                    height,
                    width,
                    original,
                },
                _,
            ) => {
                let classes = self.labels.len();
                let (oh, ow) = original;
                let map = bilinear_argmax(&logits, classes, height, width, oh, ow);
                let mut present = vec![false; classes];
                for &l in &map {
                    present[l as usize] = true;
                }
                let keep: Vec<(u16, usize, Option<f64>)> = (0..classes)
                    .filter(|&l| present[l])
                    .map(|l| (l as u16, l, None))
                    .collect();
                Self::masks(&map, original, &keep)
            }
            (
                Raw::Panoptic {
                    classes,
                    masks,
                    height,
                    width,
                    original,
                },
                Mode::Panoptic {
                    threshold,
                    mask_threshold,
                    overlap,
                },
            ) => self.panoptic(
                &classes,
                &masks,
                (height, width),
                original,
                (threshold, mask_threshold, overlap),
            ),
            (Raw::Panoptic { .. }, Mode::Semantic) => {
                Err("panoptic outputs of a semantic model".into())
            }
        }
    }

    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef> {
        struct_column(Self::fields(), &rows, false, |b, r| {
            b.field_builder::<StringBuilder>(0)
                .expect("label")
                .append_value(&self.labels[r.label]);
            b.field_builder::<Float64Builder>(1)
                .expect("score")
                .append_option(r.score);
            b.field_builder::<BinaryBuilder>(2)
                .expect("mask")
                .append_value(&r.mask);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::weighted_argmax;

    #[test]
    fn weighted_masks_go_to_the_best_query_and_count_their_own_area() {
        // Two 1x2 probability planes; scores weight them.
        let probs = [0.9, 0.2, 0.6, 0.8];
        let (map, own) = weighted_argmax(&probs, &[1.0, 1.0], 1, 2, 1, 2, 0.5);
        assert_eq!(map, vec![0, 1]);
        assert_eq!(own, vec![1, 2]);
        let (map, own) = weighted_argmax(&probs, &[0.5, 1.0], 1, 2, 1, 2, 0.5);
        assert_eq!(map, vec![1, 1]);
        assert_eq!(own, vec![0, 2], "0.9 x 0.5 falls under the mask threshold");
    }
}
