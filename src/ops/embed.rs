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

use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::value::{Outlet, SymbolicDimensions, Tensor, TensorElementType, ValueType};
use tokenizers::Encoding;

use super::OpError;
use super::core::MODEL;
use super::text::{Encoded, TensorView, TextInput, TextModel, TextTask, Truncating, only_window};
use crate::runtime::ModelDir;
use crate::runtime::pool::{BuildGraph, Fetched, SessionInfo, Worker};
use crate::runtime::tensor::{Data, Input};

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

/// The role of the session that pools token vectors where the model ran.
pub const POOLING: &str = "pooling";

/// The pooling graph's inputs and output.
const TOKENS: &str = "token_embeddings";
const MASK: &str = "attention_mask";
const POOLED: &str = "sentence_embedding";

/// What an embed operator does, from its options and model directory (before any session).
#[derive(Debug, Clone)]
pub struct Settings {
    output: Option<String>,
    pooling: Pooling,
    normalize: bool,
    max_length: Option<usize>,
    hidden_size: Option<usize>,
}

/// The model output an embed operator reads.
#[derive(Debug)]
struct Chosen {
    name: String,
    element: Option<TensorElementType>,
    /// One vector per row already ([batch, dim]).
    pooled: bool,
    dim: usize,
}

impl Settings {
    pub fn resolve(options: &EmbedOptions, model: &ModelDir) -> Result<Self, OpError> {
        let st_pooling = model.pooling_config()?.map(|p| {
            if p.pooling_mode_cls_token {
                Pooling::Cls
            } else {
                Pooling::Mean
            }
        });
        let normalize = match options.normalize {
            Some(n) => n,
            None => model.st_normalizes()?.unwrap_or(false),
        };
        Ok(Settings {
            output: options.output.clone(),
            pooling: options.pooling.or(st_pooling).unwrap_or(Pooling::Mean),
            normalize,
            max_length: options.max_length,
            hidden_size: model.config.hidden_size,
        })
    }

    /// The model output to read, from what the model's session returns.
    fn choose(&self, session: &SessionInfo) -> Result<Chosen, OpError> {
        let outputs = &session.outputs;
        let path = session.path.display();
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        let output = match &self.output {
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
                    "{path}: no embedding output (has {}); set options.output to the output to read",
                    names.join(", ")
                ))
            })?,
        };
        let info = outputs.iter().find(|o| o.name == output).ok_or_else(|| {
            OpError::Model(format!(
                "{path}: no output named '{output}' (has {})",
                names.join(", ")
            ))
        })?;
        let pooled = match info.shape.len() {
            2 => true,
            3 => false,
            n => {
                return Err(OpError::Model(format!(
                    "{path}: output '{output}' has {n} dimensions; expected [batch, dim] or [batch, tokens, dim]"
                )));
            }
        };
        let dim = match info.shape.last() {
            Some(&d) if d > 0 => d as usize,
            _ => self.hidden_size.ok_or_else(|| {
                OpError::Model(format!(
                    "{path}: the embedding size of '{output}' is dynamic and config.json has no hidden_size"
                ))
            })?,
        };
        Ok(Chosen {
            name: output,
            element: info.element,
            pooled,
            dim,
        })
    }

    /// Whether the model's `chosen` output is pooled by the pooling session: token vectors
    /// with `mean` or `cls` pooling.
    fn pools(&self, chosen: &Chosen) -> bool {
        !chosen.pooled && self.pooling != Pooling::None
    }

    /// The session that pools (and normalizes) token vectors where the model runs, so that a
    /// [batch, tokens, dim] tensor never leaves the GPU: built after the model's session, for
    /// token outputs with `mean` or `cls` pooling. A model that cannot be read gets none here
    /// (resolving the task reports why).
    pub fn pooling_graph(&self) -> BuildGraph {
        let settings = self.clone();
        BuildGraph(Arc::new(move |before: &[SessionInfo]| {
            let Some(chosen) = before.first().and_then(|s| settings.choose(s).ok()) else {
                return Ok(None);
            };
            if !settings.pools(&chosen) {
                return Ok(None);
            }
            pooling_graph(settings.pooling, settings.normalize, chosen.element)
                .map(Some)
                .map_err(|e| format!("building the pooling graph: {e}"))
        }))
    }
}

/// sentence-transformers' pooling as an ONNX graph (opset 18): `token_embeddings` [batch,
/// tokens, dim] (any float type) and, for `mean`, `attention_mask` [batch, tokens] in,
/// `sentence_embedding` [batch, dim] Float32 out. Mean: sum(h * m) / max(sum(m), 1e-9); cls:
/// the first token; normalize: v / max(||v||, 1e-12), as torch's `normalize`.
fn pooling_graph(
    pooling: Pooling,
    normalize: bool,
    element: Option<TensorElementType>,
) -> ort::Result<Model> {
    let tensor = |ty, rank| ValueType::Tensor {
        ty,
        shape: vec![-1i64; rank].into(),
        dimension_symbols: SymbolicDimensions::empty(rank),
    };
    let element = element.unwrap_or(TensorElementType::Float32);
    let mut graph = Graph::new()?;
    let mut inputs = vec![Outlet::new(TOKENS, tensor(element, 3))];
    if pooling == Pooling::Mean {
        inputs.push(Outlet::new(MASK, tensor(TensorElementType::Int64, 2)));
    }
    graph.set_inputs(inputs)?;
    graph.set_outputs([Outlet::new(POOLED, tensor(TensorElementType::Float32, 2))])?;
    let cpu = Allocator::default();
    let mut axis = |name: &str, value: i64| -> ort::Result<()> {
        let mut t = Tensor::<i64>::new(&cpu, [1usize])?;
        t.extract_tensor_mut().1[0] = value;
        graph.add_initializer(name, t, false)
    };
    axis("axis_1", 1)?;
    axis("axis_2", 2)?;
    let mut scalar_f32 = |name: &str, value: f32| -> ort::Result<()> {
        let mut t = Tensor::<f32>::new(&cpu, Vec::<i64>::new())?;
        t.extract_tensor_mut().1[0] = value;
        graph.add_initializer(name, t, false)
    };
    scalar_f32("eps_count", 1e-9)?;
    scalar_f32("eps_norm", 1e-12)?;
    let mut first = Tensor::<i64>::new(&cpu, Vec::<i64>::new())?;
    first.extract_tensor_mut().1[0] = 0;
    graph.add_initializer("first", first, false)?;

    // ONNX's TensorProto.DataType FLOAT.
    let float = || Attribute::new("to", 1i64);
    let keepdims = |k: i64| Attribute::new("keepdims", k);
    let mut node = |op: &str, inputs: &[&str], output: &str, attributes: Vec<Attribute>| {
        graph.add_node(Node::new(
            op,
            ONNX_DOMAIN,
            output,
            inputs,
            [output],
            attributes,
        )?)
    };
    let hidden = if element == TensorElementType::Float32 {
        TOKENS
    } else {
        node("Cast", &[TOKENS], "hidden", vec![float()?])?;
        "hidden"
    };
    let vector = if normalize { "vector" } else { POOLED };
    match pooling {
        Pooling::Mean => {
            node("Cast", &[MASK], "mask", vec![float()?])?;
            node("Unsqueeze", &["mask", "axis_2"], "mask_3d", vec![])?;
            node("Mul", &[hidden, "mask_3d"], "masked", vec![])?;
            node(
                "ReduceSum",
                &["masked", "axis_1"],
                "sum",
                vec![keepdims(0)?],
            )?;
            node(
                "ReduceSum",
                &["mask", "axis_1"],
                "count",
                vec![keepdims(1)?],
            )?;
            node("Max", &["count", "eps_count"], "count_min", vec![])?;
            node("Div", &["sum", "count_min"], vector, vec![])?;
        }
        Pooling::Cls => {
            node(
                "Gather",
                &[hidden, "first"],
                vector,
                vec![Attribute::new("axis", 1i64)?],
            )?;
        }
        Pooling::None => unreachable!("pooling none keeps every token vector"),
    }
    if normalize {
        node("ReduceL2", &[vector, "axis_1"], "norm", vec![keepdims(1)?])?;
        node("Max", &["norm", "eps_norm"], "norm_min", vec![])?;
        node("Div", &[vector, "norm_min"], POOLED, vec![])?;
    }
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 18)?])?;
    model.set_graph(graph)?;
    Ok(model)
}

/// The embed task, resolved against its model at plan time.
#[derive(Debug)]
pub struct Embed {
    /// The one output read: `[output]` (the pooling session's when it pools).
    output: [String; 1],
    /// True when the output read is already one vector per row ([batch, dim]).
    pooled: bool,
    pooling: Pooling,
    /// Normalize on the host (when the pooling session does not).
    normalize: bool,
    dim: usize,
    encoder: Truncating,
    /// The model output the pooling session takes, when pooling runs where the model runs.
    pools: Option<String>,
}

impl Embed {
    /// Resolves the task against the model's session and the pooling session, if one was
    /// built.
    pub fn resolve(
        settings: &Settings,
        text: &TextModel,
        model: &SessionInfo,
        pooling: Option<&SessionInfo>,
    ) -> Result<Self, OpError> {
        let encoder = text.truncating(settings.max_length)?;
        let chosen = settings.choose(model)?;
        let pools = match pooling {
            Some(_) => Some(chosen.name.clone()),
            None if !settings.pools(&chosen) => None,
            None => {
                return Err(OpError::Model(format!(
                    "{}: no pooling session was built for output '{}'",
                    model.path.display(),
                    chosen.name
                )));
            }
        };
        Ok(Embed {
            output: [if pools.is_some() {
                POOLED.to_string()
            } else {
                chosen.name
            }],
            pooled: chosen.pooled || pools.is_some(),
            pooling: settings.pooling,
            normalize: settings.normalize && pools.is_none(),
            dim: chosen.dim,
            encoder,
            pools,
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
        // Token vectors: `pooling: none` (mean and cls pool in the pooling session).
        out.expect_shape(&[enc.rows, usize::MAX, dim])?;
        let seq = shape[1] as usize;
        for r in 0..enc.rows {
            let mask = &enc.mask[r * enc.len..(r + 1) * enc.len];
            let hidden = &data[r * seq * dim..(r + 1) * seq * dim];
            let tokens = mask.iter().take(seq).filter(|&&m| m != 0).count();
            let mut v = hidden[..tokens * dim].to_vec();
            if self.normalize {
                v.chunks_mut(dim).for_each(l2_normalize);
            }
            rows.push(v);
        }
        Ok(rows)
    }

    /// With pooling where the model runs: the model's token vectors stay where it ran and go
    /// to the pooling session, and only [batch, dim] comes back.
    fn run(&self, worker: &mut Worker, text: &TextModel, enc: &Encoded) -> Result<Fetched, String> {
        let Some(tokens) = &self.pools else {
            return worker.run_selected(MODEL, text.inputs(enc), &self.output);
        };
        let hidden = worker.run_kept(MODEL, text.inputs(enc), tokens)?;
        let mut inputs = Vec::new();
        if self.pooling == Pooling::Mean {
            let shape = vec![enc.rows as i64, enc.len as i64];
            inputs.push(Input::new(
                MASK.to_string(),
                shape,
                Data::I64(enc.mask.clone()),
            ));
        }
        let mut out =
            worker.run_with(POOLING, inputs, vec![(TOKENS.to_string(), hidden.into())])?;
        let pooled = out
            .remove(POOLED)
            .ok_or_else(|| format!("the pooling session returned no '{POOLED}'"))?;
        Ok(vec![(POOLED.to_string(), pooled)])
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

#[cfg(test)]
mod tests {
    use super::*;
    use ort::session::Session;

    /// sentence-transformers' pooling, computed here on the host.
    fn reference(
        hidden: &[f32],
        mask: &[i64],
        dims: [usize; 3],
        p: Pooling,
        norm: bool,
    ) -> Vec<f32> {
        let [rows, tokens, dim] = dims;
        let mut out = Vec::new();
        for r in 0..rows {
            let h = &hidden[r * tokens * dim..(r + 1) * tokens * dim];
            let mut v = match p {
                Pooling::Cls => h[..dim].to_vec(),
                _ => {
                    let m = &mask[r * tokens..(r + 1) * tokens];
                    let count = m.iter().filter(|&&x| x != 0).count() as f32;
                    (0..dim)
                        .map(|d| {
                            (0..tokens)
                                .map(|t| h[t * dim + d] * m[t] as f32)
                                .sum::<f32>()
                                / count.max(1e-9)
                        })
                        .collect()
                }
            };
            if norm {
                l2_normalize(&mut v);
            }
            out.extend(v);
        }
        out
    }

    /// The pooling graph gives sentence-transformers' mean and cls pooling, normalized or
    /// not, from Float32 and Float16 token vectors, with padding masked out (a row of only
    /// padding pools to zeros, as the clamped count makes it).
    #[test]
    fn the_pooling_graph_pools_as_sentence_transformers_does() {
        let env = crate::runtime::onnxruntime::environment().unwrap();
        let dims = [3usize, 4, 5];
        let hidden: Vec<f32> = (0..60)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mask: Vec<i64> = vec![1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        for element in [TensorElementType::Float32, TensorElementType::Float16] {
            // The host reads Float16 outputs as f32: the reference takes the rounded values.
            let hidden: Vec<f32> = match element {
                TensorElementType::Float16 => hidden
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect(),
                _ => hidden.clone(),
            };
            for pooling in [Pooling::Mean, Pooling::Cls] {
                for normalize in [false, true] {
                    let what = format!("{element:?} {pooling:?} normalize {normalize}");
                    let model = pooling_graph(pooling, normalize, Some(element)).unwrap();
                    let mut session = model
                        .into_session(&Session::builder(&env).unwrap())
                        .unwrap();
                    let shape = vec![3i64, 4, 5];
                    let tokens = match element {
                        TensorElementType::Float16 => Tensor::from_array((
                            shape,
                            hidden
                                .iter()
                                .map(|&x| half::f16::from_f32(x))
                                .collect::<Vec<_>>(),
                        ))
                        .unwrap()
                        .into_dyn(),
                        _ => Tensor::from_array((shape, hidden.clone()))
                            .unwrap()
                            .into_dyn(),
                    };
                    let mut inputs = vec![(TOKENS.to_string(), tokens)];
                    if pooling == Pooling::Mean {
                        let m = Tensor::from_array((vec![3i64, 4], mask.clone())).unwrap();
                        inputs.push((MASK.to_string(), m.into_dyn()));
                    }
                    let out = session.run(inputs).unwrap();
                    let (shape, got) = out[POOLED].try_extract_tensor::<f32>().unwrap();
                    assert_eq!(&shape[..], &[3, 5], "{what}");
                    let want = reference(&hidden, &mask, dims, pooling, normalize);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-6, "{what}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }
}
