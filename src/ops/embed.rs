//! `embed`: sentence embeddings (feature-extraction) with sentence-transformers pooling.
//!
//! Output: `FixedSizeList<Float32, dim>` per row, or with `pooling: none` on a model that outputs
//! token states, `List<FixedSizeList<Float32, dim>>` (one vector per token, as the
//! `feature-extraction` pipeline returns them).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, ListArray};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use tokenizers::{Encoding, TruncationParams};

use super::text::{Encoded, TensorView, TextInput, TextModel, TextTask, Truncating, only_window};
use crate::runtime::ModelDir;

/// Options of an `embed` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedOptions {
    /// How token vectors become one vector: `mean` (masked mean), `cls` (first token) or `none`
    /// (all token vectors). Default: the model's `1_Pooling/config.json`, else `mean`. Ignored for
    /// models that output `sentence_embedding` themselves.
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// Divide each vector by its L2 norm. Default: true when the model's `modules.json` has a
    /// Normalize module, else false.
    #[serde(default)]
    pub normalize: Option<bool>,
    /// Truncate texts to this many tokens (at most the model's own limit).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// The model output to read. Default: `sentence_embedding` if present, else
    /// `last_hidden_state`, else `token_embeddings`.
    #[serde(default)]
    pub output: Option<String>,
}

/// Pooling strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Mean,
    Cls,
    None,
}

/// The embed task, resolved against its model at plan time.
#[derive(Debug)]
pub struct Embed {
    /// The one model output read: `[output]`.
    output: [String; 1],
    /// True when the output is already one vector per row ([batch, dim]).
    pooled: bool,
    pooling: Pooling,
    normalize: bool,
    dim: usize,
    encoder: Truncating,
}

impl Embed {
    pub fn resolve(
        options: &EmbedOptions,
        model: &ModelDir,
        text: &TextModel,
    ) -> Result<Self, OpError> {
        let outputs = &text.outputs;
        let max_length = options
            .max_length
            .map_or(text.max_length, |m| m.min(text.max_length));
        let encoder = Truncating::new(
            &text.tokenizer,
            TruncationParams {
                max_length,
                ..Default::default()
            },
        )?;
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        let output = match &options.output {
            Some(o) => o.clone(),
            None => [
                "sentence_embedding",
                "last_hidden_state",
                "token_embeddings",
            ]
            .into_iter()
            .find(|n| names.contains(n))
            .map(str::to_string)
            .ok_or_else(|| {
                OpError::Model(format!(
                    "{}: no embedding output (has {}); set options.output to the output to read",
                    model.onnx.display(),
                    names.join(", ")
                ))
            })?,
        };
        let info = outputs.iter().find(|o| o.name == output).ok_or_else(|| {
            OpError::Model(format!(
                "{}: no output named '{output}' (has {})",
                model.onnx.display(),
                names.join(", ")
            ))
        })?;
        let pooled = match info.shape.len() {
            2 => true,
            3 => false,
            n => {
                return Err(OpError::Model(format!(
                    "{}: output '{output}' has {n} dimensions; expected [batch, dim] or [batch, tokens, dim]",
                    model.onnx.display()
                )));
            }
        };
        let dim = match info.shape.last() {
            Some(&d) if d > 0 => d as usize,
            _ => model.config.hidden_size.ok_or_else(|| {
                OpError::Model(format!(
                    "{}: the embedding size of '{output}' is dynamic and config.json has no hidden_size",
                    model.onnx.display()
                ))
            })?,
        };
        let st_pooling = model.pooling_config()?.map(|p| {
            if p.pooling_mode_cls_token {
                Pooling::Cls
            } else {
                Pooling::Mean
            }
        });
        let pooling = options.pooling.or(st_pooling).unwrap_or(Pooling::Mean);
        let normalize = match options.normalize {
            Some(n) => n,
            None => model.st_normalizes()?.unwrap_or(false),
        };
        Ok(Embed {
            output: [output],
            pooled,
            pooling,
            normalize,
            dim,
            encoder,
        })
    }

    /// True when rows are lists of token vectors.
    fn per_token(&self) -> bool {
        !self.pooled && self.pooling == Pooling::None
    }

    fn item_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            self.dim as i32,
        )
    }
}

fn l2_normalize(v: &mut [f32]) {
    // torch.nn.functional.normalize: x / max(||x||, 1e-12)
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

impl TextTask for Embed {
    /// Flat vector values: `dim` floats, or `tokens * dim` for per-token output.
    type Window = Vec<f32>;
    type Row = Vec<f32>;

    fn output_type(&self) -> DataType {
        if self.per_token() {
            DataType::List(Arc::new(Field::new("item", self.item_type(), false)))
        } else {
            self.item_type()
        }
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
        let out = &outputs[0];
        let (shape, data) = (&out.shape[..], &out.data[..]);
        let dim = self.dim;
        let mut rows = Vec::with_capacity(enc.rows);
        if self.pooled {
            out.expect_shape(&[enc.rows, dim])?;
            for r in 0..enc.rows {
                let mut v = data[r * dim..(r + 1) * dim].to_vec();
                if self.normalize {
                    l2_normalize(&mut v);
                }
                rows.push(v);
            }
            return Ok(rows);
        }
        out.expect_shape(&[enc.rows, usize::MAX, dim])?;
        let seq = shape[1] as usize;
        for r in 0..enc.rows {
            let mask = &enc.mask[r * enc.len..(r + 1) * enc.len];
            let hidden = &data[r * seq * dim..(r + 1) * seq * dim];
            let mut v = match self.pooling {
                Pooling::Cls => hidden[..dim].to_vec(),
                Pooling::Mean => {
                    let mut sum = vec![0f32; dim];
                    let mut count = 0f32;
                    for (t, &m) in mask.iter().enumerate().take(seq) {
                        if m != 0 {
                            count += 1.0;
                            for (s, h) in sum.iter_mut().zip(&hidden[t * dim..(t + 1) * dim]) {
                                *s += h;
                            }
                        }
                    }
                    let count = count.max(1e-9);
                    sum.iter_mut().for_each(|s| *s /= count);
                    sum
                }
                Pooling::None => {
                    let tokens = mask.iter().take(seq).filter(|&&m| m != 0).count();
                    let mut v = hidden[..tokens * dim].to_vec();
                    if self.normalize {
                        v.chunks_mut(dim).for_each(l2_normalize);
                    }
                    rows.push(v);
                    continue;
                }
            };
            if self.normalize {
                l2_normalize(&mut v);
            }
            rows.push(v);
        }
        Ok(rows)
    }

    fn to_array(&self, rows: Vec<Option<Vec<f32>>>) -> Result<ArrayRef> {
        let dim = self.dim;
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        if self.per_token() {
            let mut offsets = Vec::with_capacity(rows.len() + 1);
            offsets.push(0i32);
            let mut values = Vec::new();
            let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<_>>());
            for row in &rows {
                if let Some(v) = row {
                    values.extend_from_slice(v);
                }
                offsets.push((values.len() / dim) as i32);
            }
            let vectors = FixedSizeListArray::try_new(
                item,
                dim as i32,
                Arc::new(Float32Array::from(values)),
                None,
            )?;
            let list = ListArray::try_new(
                Arc::new(Field::new("item", self.item_type(), false)),
                OffsetBuffer::new(offsets.into()),
                Arc::new(vectors),
                Some(nulls),
            )?;
            return Ok(Arc::new(list));
        }
        let mut values = Vec::with_capacity(rows.len() * dim);
        let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<_>>());
        for row in &rows {
            match row {
                Some(v) => values.extend_from_slice(v),
                None => values.extend(std::iter::repeat_n(0f32, dim)),
            }
        }
        let array = FixedSizeListArray::try_new(
            item,
            dim as i32,
            Arc::new(Float32Array::from(values)),
            Some(nulls),
        )?;
        Ok(Arc::new(array))
    }
}
