//! `detect`: object detection, for two export families.
//!
//! - DETR-style (`logits` + `pred_boxes`), as the `object-detection` pipeline's
//!   `post_process_object_detection` does it: softmax over every class, the last ("no object")
//!   dropped after the softmax, keep queries scoring `> threshold`, boxes from normalized
//!   (cx, cy, w, h) to corners in original-image pixels. Query order, no NMS.
//! - YOLO-style (Ultralytics exports: one output `[batch, 4 + classes, anchors]` of boxes in
//!   model pixels and per-class scores), letterboxed input: keep anchors whose best class
//!   scores `> threshold`, non-maximum suppression per class (or across classes) at
//!   `iou_threshold`, boxes mapped back through the letterbox and clipped to the image. Class
//!   names come from the export's `names` metadata.
//!
//! Output: `List<Struct<label: Utf8, score: Float64, box: Struct<xmin, ymin, xmax, ymax:
//! Float64>>>` in original-image pixels. The pipeline truncates box corners to integers;
//! ferry keeps them as floats (`CAST(... AS INT)` truncates the same way).

use datafusion::arrow::array::{ArrayRef, Float64Builder, StringBuilder, StructBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::core::{list_of_structs, struct_column};
use super::image::processor::{PixelValues, Resize};
use super::image::{ImageModel, ImageOptions, ImageTask};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of a `detect` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectOptions {
    /// Keep detections scoring more than this. Default: 0.5 for DETR-style models (the
    /// pipeline's), 0.25 for YOLO-style models (Ultralytics').
    #[serde(default)]
    pub threshold: Option<f64>,
    /// YOLO: suppress a box overlapping a better one by more than this IoU (default 0.45).
    #[serde(default)]
    pub iou_threshold: Option<f64>,
    /// YOLO: `class` suppresses overlaps within a class (Ultralytics' default), `agnostic`
    /// across classes.
    #[serde(default)]
    pub nms: Option<Nms>,
    /// YOLO: keep at most this many detections per image (default 300).
    #[serde(default)]
    pub max_detections: Option<usize>,
    /// YOLO: class names in class order, when the export has no `names` metadata.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// How images are read and preprocessed. YOLO exports need `preprocess.letterbox`.
    #[serde(default)]
    pub image: ImageOptions,
}

/// How non-maximum suppression groups boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Nms {
    Class,
    Agnostic,
}

/// The export family.
#[derive(Debug)]
enum Family {
    Detr,
    Yolo { iou: f32, nms: Nms, max: usize },
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct Detect {
    labels: Vec<String>,
    threshold: f32,
    family: Family,
    outputs: Vec<String>,
}

/// One detection in original-image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub label: usize,
    pub score: f32,
    pub xmin: f64,
    pub ymin: f64,
    pub xmax: f64,
    pub ymax: f64,
}

impl Detect {
    pub fn resolve(
        options: &DetectOptions,
        model: &ModelDir,
        image: &ImageModel,
    ) -> Result<Self, OpError> {
        let has = |n: &str| image.outputs.iter().any(|o| o.name == n);
        if has("logits") && has("pred_boxes") {
            let labels = model.config.labels();
            if labels.is_empty() {
                return Err(OpError::Model(format!(
                    "{}: config.json has no id2label",
                    model.dir.display()
                )));
            }
            return Ok(Detect {
                labels,
                threshold: options.threshold.unwrap_or(0.5) as f32,
                family: Family::Detr,
                outputs: vec!["logits".into(), "pred_boxes".into()],
            });
        }
        let names = image
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let [yolo] = &image.outputs[..] else {
            return Err(OpError::Model(format!(
                "{}: not a detection export ferry knows: DETR-style models output logits and pred_boxes, YOLO-style models one [batch, 4 + classes, anchors] tensor (outputs: {names})",
                model.onnx.display()
            )));
        };
        if yolo.shape.len() != 3 {
            return Err(OpError::Model(format!(
                "{}: output '{}' has shape {:?}; a YOLO-style export outputs [batch, 4 + classes, anchors]",
                model.onnx.display(),
                yolo.name,
                yolo.shape
            )));
        }
        if !matches!(image.processor.resize, Resize::Letterbox(_)) {
            return Err(OpError::Options(format!(
                "{}: a YOLO-style model needs letterboxed input: set options.image.preprocess.letterbox (e.g. {{placement: center, fill: 114}} for Ultralytics exports)",
                model.onnx.display()
            )));
        }
        let labels = match (&options.labels, image.metadata.get("names")) {
            (Some(l), _) => l.clone(),
            (None, Some(names)) => parse_names(names).map_err(|e| {
                OpError::Model(format!("{}: metadata 'names': {e}", model.onnx.display()))
            })?,
            (None, None) => {
                let classes = yolo.shape[1] - 4;
                if classes <= 0 {
                    return Err(OpError::Model(format!(
                        "{}: cannot tell the class count from shape {:?}; set options.labels",
                        model.onnx.display(),
                        yolo.shape
                    )));
                }
                (0..classes).map(|i| i.to_string()).collect()
            }
        };
        if yolo.shape[1] > 0 && yolo.shape[1] as usize != labels.len() + 4 {
            return Err(OpError::Model(format!(
                "{}: {} class names but the output has {} rows (4 box coordinates + one score per class)",
                model.onnx.display(),
                labels.len(),
                yolo.shape[1]
            )));
        }
        Ok(Detect {
            labels,
            threshold: options.threshold.unwrap_or(0.25) as f32,
            family: Family::Yolo {
                iou: options.iou_threshold.unwrap_or(0.45) as f32,
                nms: options.nms.unwrap_or(Nms::Class),
                max: options.max_detections.unwrap_or(300),
            },
            outputs: vec![yolo.name.clone()],
        })
    }

    fn detr(
        &self,
        logits: &Output<'_>,
        boxes: &Output<'_>,
        pictures: &[&PixelValues],
    ) -> Result<Vec<Vec<Detection>>, String> {
        let classes = self.labels.len() + 1;
        logits.expect_shape(&[pictures.len(), usize::MAX, classes])?;
        let queries = logits.shape[1] as usize;
        boxes.expect_shape(&[pictures.len(), queries, 4])?;
        let mut out = Vec::with_capacity(pictures.len());
        for (i, pic) in pictures.iter().enumerate() {
            let (h, w) = (pic.original.0 as f32, pic.original.1 as f32);
            let mut found = Vec::new();
            for q in 0..queries {
                let at = (i * queries + q) * classes;
                let row = &logits.data[at..at + classes];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                // The best real class (the first on ties), with no-object in the denominator.
                let (label, score) = exps[..classes - 1]
                    .iter()
                    .map(|e| e / sum)
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (j, p)| {
                        if p > best.1 { (j, p) } else { best }
                    });
                if score <= self.threshold {
                    continue;
                }
                let b = &boxes.data[(i * queries + q) * 4..(i * queries + q) * 4 + 4];
                let (cx, cy, bw, bh) = (b[0], b[1], b[2], b[3]);
                found.push(Detection {
                    label,
                    score,
                    xmin: ((cx - 0.5 * bw) * w) as f64,
                    ymin: ((cy - 0.5 * bh) * h) as f64,
                    xmax: ((cx + 0.5 * bw) * w) as f64,
                    ymax: ((cy + 0.5 * bh) * h) as f64,
                });
            }
            out.push(found);
        }
        Ok(out)
    }

    fn yolo(
        &self,
        pred: &Output<'_>,
        pictures: &[&PixelValues],
        iou: f32,
        nms: Nms,
        max: usize,
    ) -> Result<Vec<Vec<Detection>>, String> {
        let rows = self.labels.len() + 4;
        pred.expect_shape(&[pictures.len(), rows, usize::MAX])?;
        let anchors = pred.shape[2] as usize;
        let mut out = Vec::with_capacity(pictures.len());
        for (i, pic) in pictures.iter().enumerate() {
            let p = &pred.data[i * rows * anchors..(i + 1) * rows * anchors];
            let at = |r: usize, a: usize| p[r * anchors + a];
            let (scale, dx, dy) = pic.letterbox.ok_or("YOLO input was not letterboxed")?;
            let (h, w) = (pic.original.0 as f64, pic.original.1 as f64);
            let mut candidates = Vec::new();
            for a in 0..anchors {
                let (label, score) = (0..self.labels.len())
                    .map(|c| at(4 + c, a))
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, s)| {
                        if s > best.1 { (c, s) } else { best }
                    });
                if score <= self.threshold {
                    continue;
                }
                let (cx, cy, bw, bh) = (at(0, a), at(1, a), at(2, a), at(3, a));
                candidates.push((
                    label,
                    score,
                    [cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0],
                ));
            }
            let kept = non_max_suppression(&candidates, iou, nms, max);
            out.push(
                kept.into_iter()
                    .map(|k| {
                        let (label, score, b) = candidates[k];
                        let x = |v: f32| ((v as f64 - dx) / scale).clamp(0.0, w);
                        let y = |v: f32| ((v as f64 - dy) / scale).clamp(0.0, h);
                        Detection {
                            label,
                            score,
                            xmin: x(b[0]),
                            ymin: y(b[1]),
                            xmax: x(b[2]),
                            ymax: y(b[3]),
                        }
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    fn fields() -> Fields {
        let corner = |n: &str| Field::new(n, DataType::Float64, false);
        Fields::from(vec![
            Field::new("label", DataType::Utf8, false),
            Field::new("score", DataType::Float64, false),
            Field::new(
                "box",
                DataType::Struct(Fields::from(vec![
                    corner("xmin"),
                    corner("ymin"),
                    corner("xmax"),
                    corner("ymax"),
                ])),
                false,
            ),
        ])
    }
}

/// Greedy non-maximum suppression: best score first (ties in input order), dropping boxes whose
/// IoU with a kept box (of the same class, unless agnostic) exceeds `iou`. Returns the kept
/// candidates' indices, best first.
pub fn non_max_suppression(
    candidates: &[(usize, f32, [f32; 4])],
    iou: f32,
    nms: Nms,
    max: usize,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[b].1.total_cmp(&candidates[a].1));
    let area = |b: &[f32; 4]| (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0);
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.len() >= max {
            break;
        }
        let (ci, _, bi) = &candidates[i];
        let suppressed = kept.iter().any(|&k| {
            let (ck, _, bk) = &candidates[k];
            if nms == Nms::Class && ci != ck {
                return false;
            }
            let iw = (bi[2].min(bk[2]) - bi[0].max(bk[0])).max(0.0);
            let ih = (bi[3].min(bk[3]) - bi[1].max(bk[1])).max(0.0);
            let inter = iw * ih;
            let union = area(bi) + area(bk) - inter;
            union > 0.0 && inter / union > iou
        });
        if !suppressed {
            kept.push(i);
        }
    }
    kept
}

/// Parses Ultralytics' `names` metadata, a Python dict literal: `{0: 'person', 1: "car"}`.
pub fn parse_names(text: &str) -> Result<Vec<String>, String> {
    let body = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or("expected a {id: 'name', ...} dict")?;
    let mut names: Vec<(usize, String)> = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let id: String = chars.by_ref().take_while(|&c| c != ':').collect();
        let id: usize = id
            .trim()
            .parse()
            .map_err(|_| format!("bad class id '{}'", id.trim()))?;
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let quote = chars
            .next()
            .filter(|q| *q == '\'' || *q == '"')
            .ok_or("expected a quoted name")?;
        let mut name = String::new();
        loop {
            match chars.next() {
                Some('\\') => name.extend(chars.next()),
                Some(c) if c == quote => break,
                Some(c) => name.push(c),
                None => return Err("unterminated name".into()),
            }
        }
        names.push((id, name));
    }
    names.sort_by_key(|(id, _)| *id);
    for (i, (id, _)) in names.iter().enumerate() {
        if *id != i {
            return Err(format!("class ids are not 0..{}", names.len()));
        }
    }
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

impl ImageTask for Detect {
    type Raw = Vec<Detection>;
    type Out = Vec<Detection>;

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
    ) -> Result<Vec<Self::Raw>, String> {
        match &self.family {
            Family::Detr => self.detr(&outputs[0], &outputs[1], pictures),
            Family::Yolo { iou, nms, max, .. } => {
                self.yolo(&outputs[0], pictures, *iou, *nms, *max)
            }
        }
    }

    fn finish(&self, raw: Self::Raw) -> Result<Self::Out, String> {
        Ok(raw)
    }

    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef> {
        struct_column(Self::fields(), &rows, false, |b, d| {
            b.field_builder::<StringBuilder>(0)
                .expect("label")
                .append_value(&self.labels[d.label]);
            b.field_builder::<Float64Builder>(1)
                .expect("score")
                .append_value(d.score as f64);
            let bx = b.field_builder::<StructBuilder>(2).expect("box");
            for (i, v) in [d.xmin, d.ymin, d.xmax, d.ymax].into_iter().enumerate() {
                bx.field_builder::<Float64Builder>(i)
                    .expect("corner")
                    .append_value(v);
            }
            bx.append(true);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ultralytics_names() {
        let names = parse_names("{0: 'person', 1: \"bi'cycle\", 2: 'it\\'s'}").unwrap();
        assert_eq!(names, vec!["person", "bi'cycle", "it's"]);
        assert!(parse_names("[1, 2]").is_err());
        assert!(parse_names("{1: 'a'}").is_err());
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let c = vec![
            (0, 0.5, [0.0, 0.0, 10.0, 10.0]),
            (0, 0.9, [1.0, 1.0, 11.0, 11.0]),
            (1, 0.8, [1.0, 1.0, 11.0, 11.0]),
            (0, 0.7, [50.0, 50.0, 60.0, 60.0]),
        ];
        assert_eq!(
            non_max_suppression(&c, 0.45, Nms::Class, 300),
            vec![1, 2, 3]
        );
        assert_eq!(
            non_max_suppression(&c, 0.45, Nms::Agnostic, 300),
            vec![1, 3]
        );
        assert_eq!(non_max_suppression(&c, 0.45, Nms::Agnostic, 1), vec![1]);
    }
}
