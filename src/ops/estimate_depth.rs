//! `estimate_depth`: monocular depth estimation, as the `depth-estimation` pipeline does it
//! (GLPN, DPT and Depth-Anything-style DPT exports): `predicted_depth` `[h, w]` resized to the
//! image's size by bicubic interpolation (torch's, A = -0.75, `align_corners=False`).
//!
//! Output: `Struct<predicted_depth: List<Float32>, width: Int32, height: Int32, depth: Binary>`
//! with the depth map row-major at the original size, and `depth` the pipeline's picture of it:
//! a PNG (8-bit grayscale) of `uint8((d - min) / (max - min) * 255)`, truncated, per image.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Float32Builder, Int32Builder, ListBuilder, StructBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::image::processor::PixelValues;
use super::image::resample::{Interpolation, torch_interpolate};
use super::image::{ImageModel, ImageOptions, ImageTask, encode_png};
use crate::runtime::ModelDir;
use crate::runtime::tensor::Output;

/// Options of an `estimate_depth` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EstimateDepthOptions {
    /// How images are read and preprocessed.
    #[serde(default)]
    pub image: ImageOptions,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct EstimateDepth {
    output: [String; 1],
}

/// One image's model depth map.
#[derive(Debug)]
pub struct RawDepth {
    data: Vec<f32>,
    height: usize,
    width: usize,
    original: (usize, usize),
}

/// One image's depth at its own size.
#[derive(Debug)]
pub struct Depth {
    pub values: Vec<f32>,
    pub width: usize,
    pub height: usize,
    /// PNG of the normalized map.
    pub picture: Vec<u8>,
}

impl EstimateDepth {
    pub fn resolve(
        _options: &EstimateDepthOptions,
        model: &ModelDir,
        image: &ImageModel,
    ) -> Result<Self, OpError> {
        let info = image
            .outputs
            .iter()
            .find(|o| o.name == "predicted_depth")
            .ok_or_else(|| {
                OpError::Model(format!(
                    "{}: no 'predicted_depth' output; export the model with task depth-estimation",
                    model.onnx.display()
                ))
            })?;
        if info.shape.len() != 3 {
            return Err(OpError::Model(format!(
                "{}: 'predicted_depth' has shape {:?}; expected [batch, height, width]",
                model.onnx.display(),
                info.shape
            )));
        }
        Ok(EstimateDepth {
            output: ["predicted_depth".to_string()],
        })
    }

    fn fields() -> Fields {
        Fields::from(vec![
            Field::new(
                "predicted_depth",
                DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
                false,
            ),
            Field::new("width", DataType::Int32, false),
            Field::new("height", DataType::Int32, false),
            Field::new("depth", DataType::Binary, false),
        ])
    }
}

/// The pipeline's `depth` picture: min-max scaled per image, times 255, truncated to uint8 (in
/// f32, as numpy computes it). A constant map (0/0 in numpy) is black.
pub fn depth_picture(values: &[f32]) -> Vec<u8> {
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    values
        .iter()
        .map(|&v| {
            let scaled = (v - min) / range * 255.0;
            if scaled.is_finite() { scaled as u8 } else { 0 }
        })
        .collect()
}

impl ImageTask for EstimateDepth {
    type Raw = RawDepth;
    type Out = Depth;

    fn output_type(&self) -> DataType {
        DataType::Struct(Self::fields())
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        pictures: &[&PixelValues],
    ) -> Result<Vec<RawDepth>, String> {
        let depth = &outputs[0];
        depth.expect_shape(&[pictures.len(), usize::MAX, usize::MAX])?;
        let (height, width) = (depth.shape[1] as usize, depth.shape[2] as usize);
        let per = height * width;
        Ok(pictures
            .iter()
            .enumerate()
            .map(|(i, pic)| RawDepth {
                data: depth.data[i * per..(i + 1) * per].to_vec(),
                height,
                width,
                original: pic.original,
            })
            .collect())
    }

    fn finish(&self, raw: RawDepth) -> Result<Depth, String> {
        let (oh, ow) = raw.original;
        let values = torch_interpolate(
            &raw.data,
            1,
            raw.height,
            raw.width,
            oh,
            ow,
            Interpolation::Bicubic,
        );
        let picture = encode_png(ow, oh, 1, &depth_picture(&values))?;
        Ok(Depth {
            values,
            width: ow,
            height: oh,
            picture,
        })
    }

    fn to_array(&self, rows: Vec<Option<Depth>>) -> Result<ArrayRef> {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let mut b = StructBuilder::new(
            Self::fields(),
            vec![
                Box::new(ListBuilder::new(Float32Builder::new()).with_field(item)),
                Box::new(Int32Builder::new()),
                Box::new(Int32Builder::new()),
                Box::new(BinaryBuilder::new()),
            ],
        );
        for row in &rows {
            let list = b
                .field_builder::<ListBuilder<Float32Builder>>(0)
                .expect("predicted_depth");
            match row {
                Some(d) => {
                    list.values().append_slice(&d.values);
                    list.append(true);
                }
                None => list.append(true),
            }
            let (w, h, png) = row.as_ref().map_or((0, 0, &[][..]), |d| {
                (d.width as i32, d.height as i32, &d.picture[..])
            });
            b.field_builder::<Int32Builder>(1)
                .expect("width")
                .append_value(w);
            b.field_builder::<Int32Builder>(2)
                .expect("height")
                .append_value(h);
            b.field_builder::<BinaryBuilder>(3)
                .expect("depth")
                .append_value(png);
            b.append(row.is_some());
        }
        Ok(Arc::new(b.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::depth_picture;

    #[test]
    fn depth_picture_truncates_and_handles_flat_maps() {
        assert_eq!(depth_picture(&[0.0, 0.5, 1.0]), vec![0, 127, 255]);
        assert_eq!(depth_picture(&[2.0, 2.0]), vec![0, 0]);
    }
}
