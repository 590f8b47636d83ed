//! The models a generation loop steps, as their sessions declare them: decoder-only exports
//! (GPT-2, Llama-family with grouped-query attention) and encoder-decoder exports (T5, BART,
//! Marian), with their KV cache or without one (the decoder re-run over the whole prefix).
//!
//! A [`Seq`] is one sequence in flight (a row, or one beam of a row): its ids, its share of the
//! cache and, for encoder-decoder models, its encoded source. [`Model::step`] feeds every
//! sequence's pending ids in one batched call and returns each sequence's next-token logits.

use std::sync::Arc;

use crate::runtime::pool::{SessionInfo, Worker};
use crate::runtime::tensor::{Data, Input, read_f32};

/// One layer's cache tensors: past inputs and the present outputs that feed them next step.
#[derive(Debug, Clone)]
pub struct Layer {
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
}

/// The cache's layers and the shape of one position of it.
#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<Layer>,
    /// Key/value heads and head size (from the past inputs' shapes).
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Cache {
    /// Reads the layers named `past_key_values.N.{part}key|value` ↔ `present.N.{part}key|value`
    /// (`part` is "" for decoder-only exports, "decoder." / "encoder." for encoder-decoders).
    /// None when the session has no such inputs.
    fn read(info: &SessionInfo, part: &str, outputs: bool) -> Result<Option<Cache>, String> {
        let path = info.path.display();
        let mut layers = Vec::new();
        let (mut kv_heads, mut head_dim) = (None, None);
        while let Some(key) = info.input(&format!("past_key_values.{}.{part}key", layers.len())) {
            let n = layers.len();
            let layer = Layer {
                past_key: key.name.clone(),
                past_value: format!("past_key_values.{n}.{part}value"),
                present_key: format!("present.{n}.{part}key"),
                present_value: format!("present.{n}.{part}value"),
            };
            if info.input(&layer.past_value).is_none() {
                return Err(format!(
                    "{path}: `{}` has no `{}` input",
                    layer.past_key, layer.past_value
                ));
            }
            if outputs {
                for present in [&layer.present_key, &layer.present_value] {
                    if info.output(present).is_none() {
                        return Err(format!(
                            "{path}: the past input `{}` has no matching output `{present}` (outputs: {}); export the model with past (optimum's `*-with-past` tasks)",
                            layer.past_key,
                            info.output_names()
                        ));
                    }
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
        Ok((!layers.is_empty()).then(|| Cache {
            layers,
            kv_heads: kv_heads.unwrap_or(0),
            head_dim: head_dim.unwrap_or(0),
        }))
    }

    fn tensors(&self) -> usize {
        self.layers.len() * 2
    }
}

fn require(info: &SessionInfo, inputs: &[&str], what: &str) -> Result<(), String> {
    for needed in inputs {
        if info.input(needed).is_none() {
            return Err(format!(
                "{}: {what} takes `{needed}` (it takes {})",
                info.path.display(),
                info.input_names()
            ));
        }
    }
    match info.output("logits") {
        None => Err(format!(
            "{}: the model has no `logits` output (it has {}); generation needs a language-model head",
            info.path.display(),
            info.output_names()
        )),
        Some(l) if l.shape.len() != 3 => Err(format!(
            "{}: `logits` should be [batch, sequence, vocabulary]; it is {:?} (a classifier, not a language model?)",
            info.path.display(),
            l.shape
        )),
        Some(_) => Ok(()),
    }
}

/// A decoder-only model, with past or without.
#[derive(Debug, Clone)]
pub struct DecoderOnly {
    /// The pool role of its session.
    pub role: &'static str,
    /// None: exported without a cache, so every step runs over the whole sequence.
    pub cache: Option<Cache>,
    /// Whether the model takes `position_ids` (Llama does; some GPT-2 exports do not).
    pub position_ids: bool,
    /// `use_cache_branch` of merged exports: set to true once a cache exists.
    pub use_cache_branch: bool,
}

impl DecoderOnly {
    /// Reads the model's inputs and cache layout from its session: every
    /// `past_key_values.N.key|value` input must have its `present.N.key|value` output, with the
    /// same fixed head count and size.
    pub fn from_session(role: &'static str, info: &SessionInfo) -> Result<Self, String> {
        require(
            info,
            &["input_ids", "attention_mask"],
            "a decoder-only generation model",
        )?;
        Ok(DecoderOnly {
            role,
            cache: Cache::read(info, "", true)?,
            position_ids: info.input("position_ids").is_some(),
            use_cache_branch: info.input("use_cache_branch").is_some(),
        })
    }
}

/// An encoder-decoder model: the encoder runs once per row; the decoder steps.
#[derive(Debug, Clone)]
pub struct Seq2Seq {
    pub encoder: &'static str,
    /// The decoder of the first step (`decoder_model.onnx`, or the merged one).
    pub decoder: &'static str,
    /// The decoder of later steps (`decoder_with_past_model.onnx`); None with a merged decoder
    /// (it serves every step) or without a cache.
    pub decoder_with_past: Option<&'static str>,
    /// Self-attention cache of the decoder(s); None: exported without a cache.
    pub cache: Option<Cache>,
    /// Cross-attention cache, made by the first step from the encoder's states.
    pub cross: Option<Cache>,
    pub use_cache_branch: bool,
    /// The encoder's hidden size.
    pub hidden: usize,
}

impl Seq2Seq {
    /// `with_past`: the session of later steps when the export splits the decoder in two.
    pub fn from_sessions(
        encoder: (&'static str, &SessionInfo),
        decoder: (&'static str, &SessionInfo),
        with_past: Option<(&'static str, &SessionInfo)>,
    ) -> Result<Self, String> {
        let enc = encoder.1;
        for needed in ["input_ids", "attention_mask"] {
            if enc.input(needed).is_none() {
                return Err(format!(
                    "{}: an encoder takes `{needed}` (it takes {})",
                    enc.path.display(),
                    enc.input_names()
                ));
            }
        }
        let Some(states) = enc.output("last_hidden_state") else {
            return Err(format!(
                "{}: the encoder has no `last_hidden_state` output (it has {})",
                enc.path.display(),
                enc.output_names()
            ));
        };
        let hidden = states.shape.last().copied().unwrap_or(-1);
        if hidden <= 0 {
            return Err(format!(
                "{}: `last_hidden_state` has no fixed hidden size ({:?})",
                enc.path.display(),
                states.shape
            ));
        }
        let dec = decoder.1;
        require(
            dec,
            &[
                "input_ids",
                "encoder_hidden_states",
                "encoder_attention_mask",
            ],
            "a decoder",
        )?;
        let use_cache_branch = dec.input("use_cache_branch").is_some();
        let (cache, cross, decoder_with_past) = match with_past {
            Some((role, info)) => {
                require(
                    info,
                    &["input_ids", "encoder_attention_mask"],
                    "a decoder with past",
                )?;
                let cache = Cache::read(info, "decoder.", true)?;
                let cross = Cache::read(info, "encoder.", false)?;
                if cache.is_none() || cross.is_none() {
                    return Err(format!(
                        "{}: a decoder with past takes `past_key_values.N.decoder.key` and `past_key_values.N.encoder.key` (it takes {})",
                        info.path.display(),
                        info.input_names()
                    ));
                }
                // The first step's decoder must make both caches.
                for layer in cache.iter().chain(&cross).flat_map(|c| &c.layers) {
                    if dec.output(&layer.present_key).is_none() {
                        return Err(format!(
                            "{}: the first-step decoder has no `{}` output for the decoder with past",
                            dec.path.display(),
                            layer.present_key
                        ));
                    }
                }
                (cache, cross, Some(role))
            }
            None if use_cache_branch => {
                let cache = Cache::read(dec, "decoder.", true)?;
                let cross = Cache::read(dec, "encoder.", true)?;
                if cache.is_none() || cross.is_none() {
                    return Err(format!(
                        "{}: a merged decoder takes its cache as `past_key_values.N.decoder|encoder.key` (it takes {})",
                        dec.path.display(),
                        dec.input_names()
                    ));
                }
                (cache, cross, None)
            }
            None => (None, None, None),
        };
        Ok(Seq2Seq {
            encoder: encoder.0,
            decoder: decoder.0,
            decoder_with_past,
            cache,
            cross,
            use_cache_branch,
            hidden: hidden as usize,
        })
    }
}

/// A generation model.
#[derive(Debug, Clone)]
pub enum Model {
    DecoderOnly(DecoderOnly),
    Seq2Seq(Seq2Seq),
}

/// A row's encoded source (encoder-decoder models), shared by its beams.
#[derive(Debug)]
pub struct Source {
    /// [len, hidden], padded to the batch it was encoded in.
    pub states: Vec<f32>,
    /// [len]: 1 for the row's tokens, 0 for padding.
    pub mask: Vec<i64>,
}

/// One sequence in flight: a row, or one beam of a row.
#[derive(Debug, Clone)]
pub struct Seq {
    /// What logits processors see: the prompt (decoder-only) or the decoder's start token
    /// (encoder-decoder), then every generated token.
    pub ids: Vec<i64>,
    /// How many of `ids` are the prompt / decoder prefix.
    pub prefix: usize,
    /// `ids[..fed]` are in the cache (with a cache) or were fed last step (without one).
    fed: usize,
    /// Decoder-only: the attention mask over the cache's positions (0 for padding).
    mask: Vec<i64>,
    /// Self-attention cache, key and value per layer, each [kv_heads, positions, head_dim].
    cache: Vec<Arc<Vec<f32>>>,
    /// Encoder-decoder: the encoded source and the cross-attention cache made from it.
    source: Option<Arc<Source>>,
    cross: Option<Arc<Vec<Vec<f32>>>>,
}

impl Seq {
    /// A decoder-only prompt (not empty).
    pub fn prompt(ids: Vec<i64>) -> Seq {
        Seq {
            prefix: ids.len(),
            ids,
            fed: 0,
            mask: Vec::new(),
            cache: Vec::new(),
            source: None,
            cross: None,
        }
    }

    /// The new tokens so far.
    pub fn generated(&self) -> &[i64] {
        &self.ids[self.prefix..]
    }

    /// A copy that continues with `token` (the cache is shared until the next step replaces it).
    pub fn child(&self, token: i64) -> Seq {
        let mut seq = self.clone();
        seq.ids.push(token);
        seq
    }

    pub fn push(&mut self, token: i64) {
        self.ids.push(token);
    }
}

impl Model {
    /// Encoder-decoder models: encodes the rows' ids (none empty) in one call and returns one
    /// start sequence per row, beginning with `decoder_start`. Decoder-only: the prompts.
    pub fn start(
        &self,
        worker: &mut Worker,
        prompts: &[Vec<i64>],
        decoder_start: i64,
        pad: i64,
    ) -> Result<Vec<Seq>, String> {
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(format!("prompt {i} has no tokens"));
        }
        let m = match self {
            Model::DecoderOnly(_) => return Ok(prompts.iter().cloned().map(Seq::prompt).collect()),
            Model::Seq2Seq(m) => m,
        };
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let (n, len) = (
            prompts.len(),
            prompts.iter().map(Vec::len).max().unwrap_or(0),
        );
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for p in prompts {
            ids.extend_from_slice(p);
            ids.resize(ids.len() + len - p.len(), pad);
            mask.extend(std::iter::repeat_n(1i64, p.len()));
            mask.resize(mask.len() + len - p.len(), 0);
        }
        let shape = vec![n as i64, len as i64];
        let outputs = worker.run(
            m.encoder,
            vec![
                Input::new("input_ids", shape.clone(), Data::I64(ids)),
                Input::new("attention_mask", shape, Data::I64(mask.clone())),
            ],
        )?;
        let states = read_f32("last_hidden_state", &outputs["last_hidden_state"])?;
        states.expect_shape(&[n, len, m.hidden])?;
        Ok(states
            .data
            .chunks_exact(len * m.hidden)
            .zip(mask.chunks_exact(len))
            .map(|(states, mask)| Seq {
                ids: vec![decoder_start],
                prefix: 1,
                fed: 0,
                mask: Vec::new(),
                cache: Vec::new(),
                source: Some(Arc::new(Source {
                    states: states.to_vec(),
                    mask: mask.to_vec(),
                })),
                cross: None,
            })
            .collect())
    }

    /// Feeds every sequence's pending ids in one call and returns the logits of each one's
    /// next token ([seqs, vocabulary], flat) and the vocabulary size. Sequences stepped together
    /// must have been started together (same cache length, same encoded batch).
    pub fn step(
        &self,
        worker: &mut Worker,
        seqs: &mut [Seq],
        pad: i64,
    ) -> Result<(Vec<f32>, usize), String> {
        match self {
            Model::DecoderOnly(m) => step_decoder_only(m, worker, seqs, pad),
            Model::Seq2Seq(m) => step_seq2seq(m, worker, seqs),
        }
    }
}

/// Concatenates every sequence's cache tensor `t` as one [batch, heads, positions, dim] input.
fn cache_input(name: &str, seqs: &[Seq], t: usize, cache: &Cache, positions: usize) -> Input {
    let data: Vec<f32> = if positions == 0 {
        Vec::new()
    } else {
        seqs.iter()
            .flat_map(|s| s.cache[t].iter().copied())
            .collect()
    };
    Input::new(
        name,
        vec![
            seqs.len() as i64,
            cache.kv_heads as i64,
            positions as i64,
            cache.head_dim as i64,
        ],
        Data::F32(data),
    )
}

/// The logits of each sequence's last position, from [batch, steps, vocabulary] logits.
fn last_logits(
    outputs: &ort::session::SessionOutputs<'_>,
    batch: usize,
    steps: usize,
) -> Result<(Vec<f32>, usize), String> {
    let logits = read_f32("logits", &outputs["logits"])?;
    let dims = logits.dims();
    if dims.len() != 3 || dims[0] != batch || dims[1] != steps || dims[2] == 0 {
        return Err(format!(
            "logits are {dims:?}, expected [{batch}, {steps}, vocabulary]"
        ));
    }
    let vocab = dims[2];
    let mut out = Vec::with_capacity(batch * vocab);
    for row in logits.data.chunks_exact(steps * vocab) {
        out.extend_from_slice(&row[(steps - 1) * vocab..]);
    }
    Ok((out, vocab))
}

/// Stores each sequence's share of the present outputs of `cache` ([batch, heads, positions,
/// dim]) as its cache.
fn store_cache(
    outputs: &ort::session::SessionOutputs<'_>,
    cache: &Cache,
    seqs: &mut [Seq],
    positions: usize,
) -> Result<(), String> {
    let per_seq = cache.kv_heads * positions * cache.head_dim;
    for s in seqs.iter_mut() {
        s.cache.resize(cache.tensors(), Arc::new(Vec::new()));
    }
    for (l, layer) in cache.layers.iter().enumerate() {
        for (t, name) in [
            (2 * l, &layer.present_key),
            (2 * l + 1, &layer.present_value),
        ] {
            let present = read_f32(name, &outputs[name.as_str()])?;
            present.expect_shape(&[seqs.len(), cache.kv_heads, positions, cache.head_dim])?;
            for (s, data) in seqs.iter_mut().zip(present.data.chunks_exact(per_seq)) {
                s.cache[t] = Arc::new(data.to_vec());
            }
        }
    }
    Ok(())
}

fn step_decoder_only(
    m: &DecoderOnly,
    worker: &mut Worker,
    seqs: &mut [Seq],
    pad: i64,
) -> Result<(Vec<f32>, usize), String> {
    let batch = seqs.len();
    if batch == 0 {
        return Ok((Vec::new(), 0));
    }
    // Without a cache every step feeds the whole sequence.
    if m.cache.is_none() {
        for s in seqs.iter_mut() {
            s.fed = 0;
            s.mask.clear();
        }
    }
    let past = seqs[0].mask.len();
    if seqs.iter().any(|s| s.mask.len() != past) {
        return Err("sequences stepped together must share their cache length".into());
    }
    let steps = seqs.iter().map(|s| s.ids.len() - s.fed).max().unwrap_or(0);
    if steps == 0 {
        return Err("no sequence has a token to feed".into());
    }
    let total = past + steps;
    // Each sequence's pending ids, left-padded to the longest.
    let mut ids = Vec::with_capacity(batch * steps);
    let mut mask = Vec::with_capacity(batch * total);
    for s in seqs.iter_mut() {
        let pending = &s.ids[s.fed..];
        let padding = steps - pending.len();
        ids.extend(std::iter::repeat_n(pad, padding));
        ids.extend_from_slice(pending);
        s.mask.extend(std::iter::repeat_n(0, padding));
        s.mask.extend(std::iter::repeat_n(1, pending.len()));
        mask.extend_from_slice(&s.mask);
    }
    let mut inputs = vec![
        Input::new(
            "input_ids",
            vec![batch as i64, steps as i64],
            Data::I64(ids),
        ),
        Input::new(
            "attention_mask",
            vec![batch as i64, total as i64],
            Data::I64(mask),
        ),
    ];
    if m.position_ids {
        // transformers: cumsum(mask) - 1, padding at position 1; this step's last `steps`.
        let mut positions = Vec::with_capacity(batch * steps);
        for s in seqs.iter() {
            let mut running = 0i64;
            for (i, &v) in s.mask.iter().enumerate() {
                running += v;
                if i >= past {
                    positions.push(if v == 0 { 1 } else { running - 1 });
                }
            }
        }
        inputs.push(Input::new(
            "position_ids",
            vec![batch as i64, steps as i64],
            Data::I64(positions),
        ));
    }
    if m.use_cache_branch {
        inputs.push(Input::new(
            "use_cache_branch",
            vec![1],
            Data::Bool(vec![past > 0]),
        ));
    }
    if let Some(cache) = &m.cache {
        for (l, layer) in cache.layers.iter().enumerate() {
            inputs.push(cache_input(&layer.past_key, seqs, 2 * l, cache, past));
            inputs.push(cache_input(&layer.past_value, seqs, 2 * l + 1, cache, past));
        }
    }
    let outputs = worker.run(m.role, inputs)?;
    let logits = last_logits(&outputs, batch, steps)?;
    if let Some(cache) = &m.cache {
        store_cache(&outputs, cache, seqs, total)?;
    }
    for s in seqs.iter_mut() {
        s.fed = s.ids.len();
    }
    Ok(logits)
}

fn step_seq2seq(
    m: &Seq2Seq,
    worker: &mut Worker,
    seqs: &mut [Seq],
) -> Result<(Vec<f32>, usize), String> {
    let batch = seqs.len();
    if batch == 0 {
        return Ok((Vec::new(), 0));
    }
    let sources: Vec<&Arc<Source>> = seqs
        .iter()
        .map(|s| {
            s.source
                .as_ref()
                .ok_or("an encoder-decoder sequence without its source")
        })
        .collect::<Result<_, _>>()?;
    let src_len = sources[0].mask.len();
    if sources.iter().any(|s| s.mask.len() != src_len) {
        return Err("sequences stepped together must come from one encoded batch".into());
    }
    let first = seqs[0].fed == 0 || m.cache.is_none();
    let past = if m.cache.is_none() { 0 } else { seqs[0].fed };
    if seqs
        .iter()
        .any(|s| (if m.cache.is_none() { 0 } else { s.fed }) != past)
    {
        return Err("sequences stepped together must share their cache length".into());
    }
    let steps = seqs[0].ids.len() - past;
    if seqs.iter().any(|s| s.ids.len() - past != steps) || steps == 0 {
        return Err("sequences stepped together must have the same number of pending ids".into());
    }
    let ids: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.ids[past..].iter().copied())
        .collect();
    let enc_mask: Vec<i64> = sources
        .iter()
        .flat_map(|s| s.mask.iter().copied())
        .collect();
    let mut inputs = vec![
        Input::new(
            "input_ids",
            vec![batch as i64, steps as i64],
            Data::I64(ids),
        ),
        Input::new(
            "encoder_attention_mask",
            vec![batch as i64, src_len as i64],
            Data::I64(enc_mask),
        ),
    ];
    let role = if first {
        m.decoder
    } else {
        m.decoder_with_past.unwrap_or(m.decoder)
    };
    let takes_states = first || m.decoder_with_past.is_none();
    if takes_states {
        let states: Vec<f32> = sources
            .iter()
            .flat_map(|s| s.states.iter().copied())
            .collect();
        inputs.push(Input::new(
            "encoder_hidden_states",
            vec![batch as i64, src_len as i64, m.hidden as i64],
            Data::F32(states),
        ));
    }
    let feeds_past = !first || m.use_cache_branch;
    if m.use_cache_branch {
        inputs.push(Input::new(
            "use_cache_branch",
            vec![1],
            Data::Bool(vec![!first]),
        ));
    }
    if let (Some(cache), Some(cross), true) = (&m.cache, &m.cross, feeds_past) {
        for (l, layer) in cache.layers.iter().enumerate() {
            inputs.push(cache_input(&layer.past_key, seqs, 2 * l, cache, past));
            inputs.push(cache_input(&layer.past_value, seqs, 2 * l + 1, cache, past));
        }
        let cross_len = if first { 0 } else { src_len };
        for (l, layer) in cross.layers.iter().enumerate() {
            for (t, name) in [(2 * l, &layer.past_key), (2 * l + 1, &layer.past_value)] {
                let data: Vec<f32> = if first {
                    Vec::new()
                } else {
                    seqs.iter()
                        .flat_map(|s| {
                            s.cross.as_ref().expect("cross cache after the first step")[t]
                                .iter()
                                .copied()
                        })
                        .collect()
                };
                inputs.push(Input::new(
                    name,
                    vec![
                        batch as i64,
                        cross.kv_heads as i64,
                        cross_len as i64,
                        cross.head_dim as i64,
                    ],
                    Data::F32(data),
                ));
            }
        }
    }
    let outputs = worker.run(role, inputs)?;
    let logits = last_logits(&outputs, batch, steps)?;
    if let Some(cache) = &m.cache {
        store_cache(&outputs, cache, seqs, past + steps)?;
    }
    if let (Some(cross), true) = (&m.cross, first) {
        let per_seq = cross.kv_heads * src_len * cross.head_dim;
        let mut tensors: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(cross.tensors()); batch];
        for layer in &cross.layers {
            for name in [&layer.present_key, &layer.present_value] {
                let present = read_f32(name, &outputs[name.as_str()])?;
                present.expect_shape(&[batch, cross.kv_heads, src_len, cross.head_dim])?;
                for (t, data) in tensors.iter_mut().zip(present.data.chunks_exact(per_seq)) {
                    t.push(data.to_vec());
                }
            }
        }
        for (s, t) in seqs.iter_mut().zip(tensors) {
            s.cross = Some(Arc::new(t));
        }
    }
    for s in seqs.iter_mut() {
        s.fed = s.ids.len();
    }
    Ok(logits)
}
