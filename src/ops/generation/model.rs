//! The generation core: decoder loops over ONNX Runtime sessions with their KV cache.
//!
//! First slice: decoder-only Optimum exports with past (`text-generation-with-past`: GPT-2,
//! Llama-family with grouped-query attention), batched prompts of any lengths (left padding,
//! attention mask, `position_ids` as `transformers` derives them from the mask), greedy search
//! stopping at `eos_token_id` or after `max_new_tokens`. The cache of every layer is read from
//! the model's `present.N.key|value` outputs and fed back as `past_key_values.N.key|value`;
//! rows that finish are dropped from the batch (the cache compacted) so they cost nothing more.
//! Beam search, sampling, logits processors, encoder-decoder models and the operators build on
//! this (see the generation issue).

use crate::runtime::pool::{SessionInfo, Worker};
use crate::runtime::tensor::{Data, Input, read_f32};

/// A decoder-only model with past, as its session declares it.
#[derive(Debug, Clone)]
pub struct DecoderOnly {
    /// The pool role of its session.
    pub role: &'static str,
    /// Layers, each with its past key and value input names and present output names.
    pub layers: Vec<Layer>,
    /// Key/value heads and head size of the cache (from the past inputs' shapes).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Whether the model takes `position_ids` (Llama does; some GPT-2 exports do not).
    pub position_ids: bool,
    /// `use_cache_branch` of merged exports: set to true once a cache exists.
    pub use_cache_branch: bool,
}

/// One layer's cache tensors.
#[derive(Debug, Clone)]
pub struct Layer {
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
}

impl DecoderOnly {
    /// Reads the cache layout from the session: every `past_key_values.N.key|value` input must
    /// have its `present.N.key|value` output, with the same fixed head count and size.
    pub fn from_session(role: &'static str, info: &SessionInfo) -> Result<Self, String> {
        let path = info.path.display();
        for needed in ["input_ids", "attention_mask"] {
            if info.input(needed).is_none() {
                return Err(format!(
                    "{path}: a decoder-only generation model takes `{needed}` (it takes {})",
                    info.input_names()
                ));
            }
        }
        if info.output("logits").is_none() {
            return Err(format!(
                "{path}: the model has no `logits` output (it has {})",
                info.output_names()
            ));
        }
        let mut layers = Vec::new();
        let (mut kv_heads, mut head_dim) = (None, None);
        while let Some(key) = info.input(&format!("past_key_values.{}.key", layers.len())) {
            let n = layers.len();
            let layer = Layer {
                past_key: key.name.clone(),
                past_value: format!("past_key_values.{n}.value"),
                present_key: format!("present.{n}.key"),
                present_value: format!("present.{n}.value"),
            };
            if info.input(&layer.past_value).is_none() {
                return Err(format!(
                    "{path}: `{}` has no `{}` input",
                    layer.past_key, layer.past_value
                ));
            }
            for present in [&layer.present_key, &layer.present_value] {
                if info.output(present).is_none() {
                    return Err(format!(
                        "{path}: the past input `{}` has no matching output `{present}` (outputs: {}); export the model with past (optimum's `text-generation-with-past`)",
                        layer.past_key,
                        info.output_names()
                    ));
                }
            }
            // [batch, heads, past_sequence_length, head_dim]
            let shape = &key.shape;
            if shape.len() != 4 || shape[1] <= 0 || shape[3] <= 0 {
                return Err(format!(
                    "{path}: `{}` should be [batch, heads, past, head_dim] with fixed heads and head_dim; it is {shape:?}",
                    key.name
                ));
            }
            let (h, d) = (shape[1] as usize, shape[3] as usize);
            if kv_heads.is_some_and(|k| k != h) || head_dim.is_some_and(|k| k != d) {
                return Err(format!("{path}: the cache's layers differ in shape"));
            }
            (kv_heads, head_dim) = (Some(h), Some(d));
            layers.push(layer);
        }
        if layers.is_empty() {
            return Err(format!(
                "{path}: the model has no `past_key_values.N.key` inputs; export it with past (optimum's `text-generation-with-past`)"
            ));
        }
        Ok(DecoderOnly {
            role,
            kv_heads: kv_heads.unwrap_or(0),
            head_dim: head_dim.unwrap_or(0),
            layers,
            position_ids: info.input("position_ids").is_some(),
            use_cache_branch: info.input("use_cache_branch").is_some(),
        })
    }
}

/// When generation stops.
#[derive(Debug, Clone)]
pub struct Stopping {
    pub max_new_tokens: usize,
    /// Any of these ends a row (it is kept as the row's last token).
    pub eos_token_ids: Vec<i64>,
}

/// One row in flight: its prompt, what it generated, and its cache.
struct Row {
    index: usize,
    /// Attention mask over cache + current tokens (0 for left padding).
    mask: Vec<i64>,
    generated: Vec<i64>,
    /// Per layer: key and value, [kv_heads, len, head_dim] each.
    cache: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Greedy search over `prompts` (token ids; none may be empty) in one batch: the new tokens
/// of each prompt, in order.
pub fn greedy(
    worker: &mut Worker,
    model: &DecoderOnly,
    prompts: &[Vec<i64>],
    stopping: &Stopping,
    pad_token_id: i64,
) -> Result<Vec<Vec<i64>>, String> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(format!("prompt {i} has no tokens"));
    }
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || stopping.max_new_tokens == 0 {
        return Ok(out);
    }
    let (heads, dim) = (model.kv_heads, model.head_dim);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // The first step: every prompt left-padded to the longest, with an empty cache.
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let mut mask = vec![0; longest - p.len()];
            mask.resize(longest, 1);
            Row {
                index,
                mask,
                generated: Vec::new(),
                cache: vec![(Vec::new(), Vec::new()); model.layers.len()],
            }
        })
        .collect();
    let mut step_ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let mut ids = vec![pad_token_id; longest - p.len()];
            ids.extend_from_slice(p);
            ids
        })
        .collect();
    let mut past_len = 0usize;
    while !rows.is_empty() {
        let batch = rows.len();
        let seq = step_ids[0].len();
        let total = past_len + seq;
        let mut inputs = vec![
            Input::new(
                "input_ids",
                vec![batch as i64, seq as i64],
                Data::I64(step_ids.concat()),
            ),
            Input::new(
                "attention_mask",
                vec![batch as i64, total as i64],
                Data::I64(rows.iter().flat_map(|r| r.mask.iter().copied()).collect()),
            ),
        ];
        if model.position_ids {
            // transformers: cumsum(mask) - 1, with padding at position 1; the step's last `seq`.
            let positions = rows.iter().flat_map(|r| {
                let mut running = 0i64;
                let all: Vec<i64> = r
                    .mask
                    .iter()
                    .map(|&m| {
                        running += m;
                        if m == 0 { 1 } else { running - 1 }
                    })
                    .collect();
                all[total - seq..].to_vec()
            });
            inputs.push(Input::new(
                "position_ids",
                vec![batch as i64, seq as i64],
                Data::I64(positions.collect()),
            ));
        }
        if model.use_cache_branch {
            inputs.push(Input::new(
                "use_cache_branch",
                vec![1],
                Data::Bool(vec![past_len > 0]),
            ));
        }
        let cache_shape = vec![batch as i64, heads as i64, past_len as i64, dim as i64];
        for (l, layer) in model.layers.iter().enumerate() {
            let keys = rows
                .iter()
                .flat_map(|r| r.cache[l].0.iter().copied())
                .collect();
            let values = rows
                .iter()
                .flat_map(|r| r.cache[l].1.iter().copied())
                .collect();
            inputs.push(Input::new(
                &layer.past_key,
                cache_shape.clone(),
                Data::F32(keys),
            ));
            inputs.push(Input::new(
                &layer.past_value,
                cache_shape.clone(),
                Data::F32(values),
            ));
        }
        let outputs = worker.run(model.role, inputs)?;
        let logits = read_f32("logits", &outputs["logits"])?;
        let dims = logits.dims();
        if dims.len() != 3 || dims[0] != batch || dims[1] != seq {
            return Err(format!(
                "logits are {dims:?}, expected [{batch}, {seq}, vocabulary]"
            ));
        }
        let vocab = dims[2];
        // Each row's cache grows by this step's tokens.
        let per_row = heads * total * dim;
        for (l, layer) in model.layers.iter().enumerate() {
            for (name, is_key) in [(&layer.present_key, true), (&layer.present_value, false)] {
                let present = read_f32(name, &outputs[name.as_str()])?;
                present.expect_shape(&[batch, heads, total, dim])?;
                for (row, data) in rows.iter_mut().zip(present.data.chunks_exact(per_row)) {
                    let (keys, values) = &mut row.cache[l];
                    *(if is_key { keys } else { values }) = data.to_vec();
                }
            }
        }
        // The next token of each row: the argmax of its last position.
        let next: Vec<i64> = logits
            .data
            .chunks_exact(seq * vocab)
            .map(|row| super::argmax(&row[(seq - 1) * vocab..]) as i64)
            .collect();
        drop(outputs);
        past_len = total;
        let mut kept = Vec::with_capacity(batch);
        for (mut row, token) in rows.into_iter().zip(next) {
            row.generated.push(token);
            let done = stopping.eos_token_ids.contains(&token)
                || row.generated.len() >= stopping.max_new_tokens;
            if done {
                out[row.index] = std::mem::take(&mut row.generated);
            } else {
                row.mask.push(1);
                kept.push(row);
            }
        }
        rows = kept;
        step_ids = rows
            .iter()
            .map(|r| vec![*r.generated.last().expect("a token was generated")])
            .collect();
    }
    Ok(out)
}
