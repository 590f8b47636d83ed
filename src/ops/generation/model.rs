//! The models a generation loop steps, as their sessions declare them: decoder-only exports
//! (GPT-2, Llama-family with grouped-query attention) and encoder-decoder exports (T5, BART,
//! Marian), with their KV cache or without one (the decoder re-run over the whole prefix).
//!
//! A [`Batch`] is the sequences stepped together (rows, or the beams of rows) with their KV
//! cache, kept between steps as the ONNX Runtime values the model returned: a step passes the
//! last step's `present` outputs back as its `past` inputs without copying them. The cache is
//! copied only when the batch changes: sequences leave ([`Batch::select`], which also reorders
//! beams and drops cache positions that have become padding for every sequence) or join
//! ([`Batch::merge`], continuous batching).

use ort::session::SessionInputValue;
use ort::value::DynValue;

use crate::runtime::pool::{SessionInfo, Worker};
use crate::runtime::tensor::{Data, Input, element_type, read_f32};

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

    /// The past input names, key then value per layer (the order of a batch's cache values).
    fn names(&self) -> impl Iterator<Item = &str> {
        self.layers
            .iter()
            .flat_map(|l| [l.past_key.as_str(), l.past_value.as_str()])
    }

    /// The present output names, in the same order.
    fn present_names(&self) -> impl Iterator<Item = &str> {
        self.layers
            .iter()
            .flat_map(|l| [l.present_key.as_str(), l.present_value.as_str()])
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

/// What an encoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderInput {
    /// `input_ids` and `attention_mask` (text).
    Tokens,
    /// `input_features` [batch, features, frames] (speech: Whisper's log-mel spectrograms),
    /// encoded to `positions` states.
    Features {
        features: usize,
        frames: usize,
        positions: usize,
    },
}

/// An encoder-decoder model: the encoder runs once per row; the decoder steps.
#[derive(Debug, Clone)]
pub struct Seq2Seq {
    pub encoder: &'static str,
    pub input: EncoderInput,
    /// The decoder takes `encoder_attention_mask` (text encoders; Whisper's does not).
    cross_mask: bool,
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
    /// The later steps' decoder takes one cross-attention cache row per source row, shared by
    /// that row's sequences (beams), which follow each other in a batch
    /// ([`super::shared_cross`]); otherwise a row per sequence.
    pub shared_cross: bool,
}

impl Seq2Seq {
    /// `with_past`: the session of later steps when the export splits the decoder in two.
    pub fn from_sessions(
        encoder: (&'static str, &SessionInfo),
        decoder: (&'static str, &SessionInfo),
        with_past: Option<(&'static str, &SessionInfo)>,
    ) -> Result<Self, String> {
        let enc = encoder.1;
        let fixed = |d: i64| (d > 0).then_some(d as usize);
        let input = match enc.input("input_features") {
            Some(f) => {
                let (Some(features), Some(frames)) = (
                    f.shape.get(1).copied().and_then(fixed),
                    f.shape.get(2).copied().and_then(fixed),
                ) else {
                    return Err(format!(
                        "{}: `input_features` has no fixed size ({:?}); ferry runs speech encoders of fixed windows",
                        enc.path.display(),
                        f.shape
                    ));
                };
                let positions = enc
                    .output("last_hidden_state")
                    .and_then(|o| o.shape.get(1).copied())
                    .and_then(fixed)
                    .unwrap_or(frames);
                EncoderInput::Features {
                    features,
                    frames,
                    positions,
                }
            }
            None => {
                for needed in ["input_ids", "attention_mask"] {
                    if enc.input(needed).is_none() {
                        return Err(format!(
                            "{}: an encoder takes `{needed}` or `input_features` (it takes {})",
                            enc.path.display(),
                            enc.input_names()
                        ));
                    }
                }
                EncoderInput::Tokens
            }
        };
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
        let cross_mask = dec.input("encoder_attention_mask").is_some();
        if input == EncoderInput::Tokens && !cross_mask {
            return Err(format!(
                "{}: a text encoder's decoder takes `encoder_attention_mask` (it takes {})",
                dec.path.display(),
                dec.input_names()
            ));
        }
        require(dec, &["input_ids", "encoder_hidden_states"], "a decoder")?;
        let use_cache_branch = dec.input("use_cache_branch").is_some();
        // The session that takes the cross-attention cache.
        let later = with_past.map_or(dec, |(_, info)| info);
        let (cache, cross, decoder_with_past) = match with_past {
            Some((role, info)) => {
                require(info, &["input_ids"], "a decoder with past")?;
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
        let shared_cross = cross.as_ref().is_some_and(|c| {
            c.names().all(|name| {
                later
                    .input(name)
                    .and_then(|i| i.symbols.first())
                    .map(String::as_str)
                    == Some(super::shared_cross::SOURCE_ROWS)
            })
        });
        Ok(Seq2Seq {
            encoder: encoder.0,
            input,
            cross_mask,
            decoder: decoder.0,
            decoder_with_past,
            cache,
            cross,
            use_cache_branch,
            hidden: hidden as usize,
            shared_cross,
        })
    }
}

/// A generation model.
#[derive(Debug, Clone)]
pub enum Model {
    DecoderOnly(DecoderOnly),
    Seq2Seq(Seq2Seq),
}

/// One sequence in flight: a row, or one beam of a row.
#[derive(Debug, Clone)]
pub struct Seq {
    /// The row (prompt) it belongs to.
    pub row: usize,
    /// What logits processors see: the prompt (decoder-only) or the decoder's start token
    /// (encoder-decoder), then every generated token.
    pub ids: Vec<i64>,
    /// How many of `ids` are the prompt / decoder prefix.
    pub prefix: usize,
    /// `ids[..fed]` are in the cache (with a cache) or were fed last step (without one).
    fed: usize,
    /// Its row is done: it only keeps its place (an encoder-decoder batch moves its sources
    /// only once enough sequences are done, see `search`).
    pub done: bool,
}

impl Seq {
    /// The new tokens so far.
    pub fn generated(&self) -> &[i64] {
        &self.ids[self.prefix..]
    }
}

/// The encoded sources of an encoder-decoder batch: a row per sequence, or a row per source row
/// when the model shares them between a row's sequences ([`Seq2Seq::shared_cross`]; see
/// [`Batch::source_rows`]).
#[derive(Debug)]
struct Sources {
    /// Source positions (the longest source of the encoded batch).
    len: usize,
    /// [seqs, len]: 1 for source tokens, 0 for padding (on the right).
    mask: Vec<i64>,
    /// `last_hidden_state`, [seqs, len, hidden]; dropped once no later step takes it.
    states: Option<DynValue>,
    /// Cross-attention cache, key then value per layer, [seqs, heads, len, head_dim]; made by
    /// the first step.
    cross: Vec<DynValue>,
}

/// Sequences stepped together, with their cache.
#[derive(Debug)]
pub struct Batch {
    pub seqs: Vec<Seq>,
    /// Self-attention cache positions held (decoder-only: left padding included).
    positions: usize,
    /// Decoder-only: each sequence's attention mask over the positions (0 = padding).
    masks: Vec<Vec<i64>>,
    /// Self-attention cache, key then value per layer, [seqs, heads, positions, head_dim];
    /// empty before the first step and without a cache.
    cache: Vec<DynValue>,
    /// Encoder-decoder models.
    sources: Option<Sources>,
}

/// The rows of a batch's sequences (a row's sequences follow each other), once per run.
fn row_runs(rows: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut runs: Vec<usize> = rows.collect();
    runs.dedup();
    runs
}

/// Where a tensor's positions sit when a row is padded: self-attention caches of decoder-only
/// models are left-padded (positions aligned right), sources are padded on the right.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Align {
    Right,
    Left,
}

/// Row `row` of a [rows, outer, len, inner] value.
struct Part<'a> {
    value: &'a DynValue,
    row: usize,
    len: usize,
}

/// Assembles a [parts, outer, to_len, inner] value from rows of others (reordered, repeated,
/// from several values), each row's positions aligned in `to_len` (dropping positions beyond
/// it, padding with zeros), in the element type of the first part.
fn assemble(
    name: &str,
    parts: &[Part<'_>],
    outer: usize,
    inner: usize,
    to_len: usize,
    align: Align,
) -> Result<DynValue, String> {
    let want = parts.first().and_then(|p| element_type(p.value));
    let mut data = vec![0f32; parts.len() * outer * to_len * inner];
    // Values read once each (a converted read copies).
    let mut read: Vec<(*const DynValue, crate::runtime::tensor::Output<'_>)> = Vec::new();
    for part in parts {
        if !read.iter().any(|(v, _)| std::ptr::eq(*v, part.value)) {
            read.push((part.value, read_f32(name, part.value)?));
        }
    }
    for (r, part) in parts.iter().enumerate() {
        let src = &read
            .iter()
            .find(|(v, _)| std::ptr::eq(*v, part.value))
            .expect("read above")
            .1;
        let per_row = outer * part.len * inner;
        let row = src
            .data
            .get(part.row * per_row..(part.row + 1) * per_row)
            .ok_or_else(|| format!("{name}: row {} is missing", part.row))?;
        let keep = part.len.min(to_len);
        let (from, to) = match align {
            Align::Right => (part.len - keep, to_len - keep),
            Align::Left => (0, 0),
        };
        for o in 0..outer {
            let src = &row[(o * part.len + from) * inner..(o * part.len + from + keep) * inner];
            let at = ((r * outer + o) * to_len + to) * inner;
            data[at..at + keep * inner].copy_from_slice(src);
        }
    }
    // Encoder states are [rows, len, hidden]: the same layout with `outer` 1.
    let shape = if outer == 1 && name == "last_hidden_state" {
        vec![parts.len() as i64, to_len as i64, inner as i64]
    } else {
        vec![
            parts.len() as i64,
            outer as i64,
            to_len as i64,
            inner as i64,
        ]
    };
    Input::new(name, shape, Data::F32(data)).into_dyn(want)
}

impl Batch {
    /// A batch of no sequences.
    pub fn empty() -> Batch {
        Batch {
            seqs: Vec::new(),
            positions: 0,
            masks: Vec::new(),
            cache: Vec::new(),
            sources: None,
        }
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Cache positions each sequence holds (left padding included).
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The row of the batch's sources each sequence reads: its own, or with sources shared
    /// between a row's sequences, the place of its row among the batch's rows (a row's
    /// sequences follow each other).
    fn source_rows(&self, shared: bool) -> Vec<usize> {
        if !shared {
            return (0..self.seqs.len()).collect();
        }
        let mut place = 0;
        self.seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i > 0 && s.row != self.seqs[i - 1].row {
                    place += 1;
                }
                place
            })
            .collect()
    }

    /// The rows whose sequences the batch holds.
    pub fn rows(&self) -> usize {
        row_runs(self.seqs.iter().map(|s| s.row)).len()
    }

    /// Encoder-decoder: source positions each sequence's cross-attention cache holds.
    pub fn source_len(&self) -> usize {
        self.sources.as_ref().map_or(0, |s| s.len)
    }

    /// The batch that continues from this one: sequence `i` of the result is `picks[i].0` of
    /// this batch followed by token `picks[i].1` (beams reorder and repeat their parents;
    /// sequences not picked leave). The cache follows its sequences; cache positions that are
    /// padding for every sequence left are dropped.
    pub fn select(&mut self, model: &Model, picks: &[(usize, i64)]) -> Result<(), String> {
        let seqs: Vec<Seq> = picks
            .iter()
            .map(|&(p, token)| {
                let mut seq = self.seqs[p].clone();
                seq.ids.push(token);
                seq
            })
            .collect();
        let identity =
            picks.len() == self.seqs.len() && picks.iter().enumerate().all(|(i, &(p, _))| i == p);
        if !identity {
            let rows: Vec<(usize, usize)> = picks.iter().map(|&(p, _)| (0, p)).collect();
            // Beams reordered within their rows: every position keeps its row, so its sources
            // (the encoder's states and cross-attention cache, one row's for all its beams)
            // stay where they are; only the self-attention cache moves. Sources shared by a
            // row's sequences also stay when the rows' sequences change in number (beams
            // starting from the first step's one sequence).
            let same_rows = if model.shares_sources() {
                row_runs(picks.iter().map(|&(p, _)| self.seqs[p].row))
                    == row_runs(self.seqs.iter().map(|s| s.row))
            } else {
                picks.len() == self.seqs.len()
                    && picks
                        .iter()
                        .enumerate()
                        .all(|(i, &(p, _))| self.seqs[p].row == self.seqs[i].row)
            };
            let kept = if same_rows { self.sources.take() } else { None };
            let sources = kept.is_none();
            *self = gather(model, &[&*self], &rows, sources)?;
            if kept.is_some() {
                self.sources = kept;
            }
        }
        self.seqs = seqs;
        Ok(())
    }

    /// Whether `other` can join this batch (both have stepped, or neither): decoder-only
    /// batches always can (the shorter cache is left-padded); an encoder-decoder decoder takes
    /// no self-attention mask, so its sequences can only step together at the same decoder
    /// length.
    pub fn can_merge(&self, other: &Batch, model: &Model) -> bool {
        match model {
            Model::DecoderOnly(_) => self.cache.len() == other.cache.len(),
            Model::Seq2Seq(_) => {
                self.positions == other.positions
                    && self.seqs.first().map(|s| (s.ids.len(), s.fed))
                        == other.seqs.first().map(|s| (s.ids.len(), s.fed))
                    && self.cache.len() == other.cache.len()
                    && self.sources.as_ref().map(|s| s.cross.len())
                        == other.sources.as_ref().map(|s| s.cross.len())
            }
        }
    }

    /// Appends the sequences of `others` (continuous batching: rows started while this batch
    /// runs), copying every cache once. All must be able to step together ([`Batch::can_merge`]).
    pub fn merge(&mut self, model: &Model, others: Vec<Batch>) -> Result<(), String> {
        let mut all: Vec<Batch> = std::iter::once(std::mem::replace(self, Batch::empty()))
            .chain(others)
            .filter(|b| !b.is_empty())
            .collect();
        if all.len() <= 1 {
            *self = all.pop().unwrap_or_else(Batch::empty);
            return Ok(());
        }
        if all.iter().any(|b| !all[0].can_merge(b, model)) {
            return Err("these batches cannot step together".into());
        }
        let from: Vec<&Batch> = all.iter().collect();
        let rows: Vec<(usize, usize)> = all
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.len()).map(move |s| (b, s)))
            .collect();
        let mut merged = gather(model, &from, &rows, true)?;
        merged.seqs = all.into_iter().flat_map(|b| b.seqs).collect();
        *self = merged;
        Ok(())
    }
}

/// The cache, masks and sources of the sequences `rows` ((batch, sequence) of `from`, batches
/// that can step together), without their ids: every self-attention cache right-aligned in the
/// longest one, leading positions that are padding for every sequence dropped; every source
/// left-aligned in the longest one (unless `sources` is false: none are gathered). One copy of
/// each tensor.
fn gather(
    model: &Model,
    from: &[&Batch],
    rows: &[(usize, usize)],
    sources: bool,
) -> Result<Batch, String> {
    let mut out = Batch::empty();
    if let Some(cache) = model.cache() {
        let longest = from.iter().map(|b| b.positions).max().unwrap_or(0);
        let masks: Vec<Vec<i64>> = rows
            .iter()
            .map(|&(b, s)| {
                let mut mask = vec![0; longest - from[b].positions];
                mask.extend_from_slice(from[b].masks.get(s).map_or(&[][..], Vec::as_slice));
                mask
            })
            .collect();
        // Decoder-only masks (encoder-decoder batches have none: nothing to drop).
        let lead = masks
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| m.iter().take_while(|&&v| v == 0).count())
            .min()
            .unwrap_or(0);
        out.positions = longest - lead;
        if matches!(model, Model::DecoderOnly(_)) {
            out.masks = masks.into_iter().map(|m| m[lead..].to_vec()).collect();
        }
        for (t, name) in cache.names().enumerate() {
            let parts: Vec<Part<'_>> = rows
                .iter()
                .map(|&(b, s)| Part {
                    value: &from[b].cache[t],
                    row: s,
                    len: from[b].positions,
                })
                .collect();
            out.cache.push(assemble(
                name,
                &parts,
                cache.kv_heads,
                cache.head_dim,
                out.positions,
                Align::Right,
            )?);
        }
    } else if matches!(model, Model::DecoderOnly(_)) {
        // Without a cache every step feeds whole sequences and makes their masks anew.
        out.masks = vec![Vec::new(); rows.len()];
    }
    if let (Model::Seq2Seq(m), true) = (model, sources) {
        let sources: Vec<&Sources> = from
            .iter()
            .map(|b| {
                b.sources
                    .as_ref()
                    .ok_or("an encoder-decoder batch without its sources")
            })
            .collect::<Result<_, _>>()?;
        let len = sources.iter().map(|s| s.len).max().unwrap_or(0);
        // The source rows the sequences read: one per sequence, or one per run of a row's
        // sequences when they share it.
        let shared = m.shared_cross;
        let places: Vec<Vec<usize>> = from.iter().map(|b| b.source_rows(shared)).collect();
        let mut picked: Vec<(usize, usize)> =
            rows.iter().map(|&(b, s)| (b, places[b][s])).collect();
        if shared {
            picked.dedup();
        }
        let rows = &picked;
        let mut mask = Vec::with_capacity(rows.len() * len);
        for &(b, s) in rows {
            let src = sources[b];
            mask.extend_from_slice(&src.mask[s * src.len..(s + 1) * src.len]);
            mask.resize(mask.len() + len - src.len, 0);
        }
        let parts = |value: &dyn for<'s> Fn(&'s Sources) -> &'s DynValue| -> Vec<Part<'_>> {
            rows.iter()
                .map(|&(b, s)| Part {
                    value: value(sources[b]),
                    row: s,
                    len: sources[b].len,
                })
                .collect()
        };
        let states = if sources.iter().all(|s| s.states.is_some()) {
            let parts = parts(&|s| s.states.as_ref().expect("checked"));
            Some(assemble(
                "last_hidden_state",
                &parts,
                1,
                m.hidden,
                len,
                Align::Left,
            )?)
        } else {
            None
        };
        let mut cross = Vec::new();
        if let (Some(layout), true) = (&m.cross, sources.iter().all(|s| !s.cross.is_empty())) {
            for (t, name) in layout.names().enumerate() {
                let parts = parts(&|s| &s.cross[t]);
                cross.push(assemble(
                    name,
                    &parts,
                    layout.kv_heads,
                    layout.head_dim,
                    len,
                    Align::Left,
                )?);
            }
        }
        out.sources = Some(Sources {
            len,
            mask,
            states,
            cross,
        });
    }
    Ok(out)
}

/// Takes the values `names` from a step's outputs, each checked to be
/// [batch, heads, positions, head_dim].
fn take_presents<'n>(
    outputs: &mut ort::session::SessionOutputs<'_>,
    names: impl Iterator<Item = &'n str>,
    cache: &Cache,
    batch: usize,
    positions: usize,
) -> Result<Vec<DynValue>, String> {
    let want = [batch, cache.kv_heads, positions, cache.head_dim];
    names
        .map(|name| {
            let value = outputs
                .remove(name)
                .ok_or_else(|| format!("the model returned no `{name}`"))?;
            match value.dtype() {
                ort::value::ValueType::Tensor { shape, .. } => {
                    crate::runtime::tensor::check_shape(name, shape, &want)?
                }
                _ => return Err(format!("`{name}` is not a tensor")),
            }
            Ok(value)
        })
        .collect()
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

/// An empty cache input, [batch, heads, 0, head_dim], for the first step of a merged export.
fn empty_past(name: &str, batch: usize, cache: &Cache) -> Input {
    Input::new(
        name,
        vec![
            batch as i64,
            cache.kv_heads as i64,
            0,
            cache.head_dim as i64,
        ],
        Data::F32(Vec::new()),
    )
}

impl Model {
    /// Whether a row's sequences share their sources ([`Seq2Seq::shared_cross`]).
    pub fn shares_sources(&self) -> bool {
        matches!(self, Model::Seq2Seq(m) if m.shared_cross)
    }

    /// The self-attention cache layout, None for exports without a cache.
    pub fn cache(&self) -> Option<&Cache> {
        match self {
            Model::DecoderOnly(m) => m.cache.as_ref(),
            Model::Seq2Seq(m) => m.cache.as_ref(),
        }
    }

    /// The batch of `prompts` ((row, token ids), none empty) before its first step.
    /// Encoder-decoder models encode the prompts now, in one call, and start each decoder with
    /// `decoder_start`.
    pub fn start(
        &self,
        worker: &mut Worker,
        prompts: &[(usize, &[i64])],
        decoder_start: i64,
        pad: i64,
    ) -> Result<Batch, String> {
        if let Some((row, _)) = prompts.iter().find(|(_, p)| p.is_empty()) {
            return Err(format!("prompt {row} has no tokens"));
        }
        let mut batch = Batch::empty();
        let m = match self {
            Model::DecoderOnly(_) => {
                batch.seqs = prompts
                    .iter()
                    .map(|&(row, ids)| Seq {
                        row,
                        ids: ids.to_vec(),
                        prefix: ids.len(),
                        fed: 0,
                        done: false,
                    })
                    .collect();
                batch.masks = vec![Vec::new(); prompts.len()];
                return Ok(batch);
            }
            Model::Seq2Seq(m) => m,
        };
        if prompts.is_empty() {
            return Ok(batch);
        }
        let (n, len) = (
            prompts.len(),
            prompts.iter().map(|(_, p)| p.len()).max().unwrap_or(0),
        );
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for (_, p) in prompts {
            ids.extend_from_slice(p);
            ids.resize(ids.len() + len - p.len(), pad);
            mask.extend(std::iter::repeat_n(1i64, p.len()));
            mask.resize(mask.len() + len - p.len(), 0);
        }
        let shape = vec![n as i64, len as i64];
        let mut outputs = worker.run(
            m.encoder,
            vec![
                Input::new("input_ids", shape.clone(), Data::I64(ids)),
                Input::new("attention_mask", shape, Data::I64(mask.clone())),
            ],
        )?;
        read_f32("last_hidden_state", &outputs["last_hidden_state"])?
            .expect_shape(&[n, len, m.hidden])?;
        let states = outputs
            .remove("last_hidden_state")
            .ok_or("the encoder returned no `last_hidden_state`")?;
        batch.seqs = prompts
            .iter()
            .map(|&(row, _)| Seq {
                row,
                ids: vec![decoder_start],
                prefix: 1,
                fed: 0,
                done: false,
            })
            .collect();
        batch.sources = Some(Sources {
            len,
            mask,
            states: Some(states),
            cross: Vec::new(),
        });
        Ok(batch)
    }

    /// The batch of speech rows ((row, features [features x frames], decoder prompt)) before
    /// its first step: the encoder runs now, in one call; each decoder starts with its prompt.
    pub fn start_features(
        &self,
        worker: &mut Worker,
        rows: &[(usize, &[f32], &[i64])],
    ) -> Result<Batch, String> {
        let mut batch = Batch::empty();
        let Model::Seq2Seq(m) = self else {
            return Err("a decoder-only model takes no encoder features".into());
        };
        let EncoderInput::Features {
            features, frames, ..
        } = m.input
        else {
            return Err("this model's encoder takes tokens, not features".into());
        };
        if rows.is_empty() {
            return Ok(batch);
        }
        let n = rows.len();
        let mut data = Vec::with_capacity(n * features * frames);
        for (row, f, prompt) in rows {
            if f.len() != features * frames {
                return Err(format!(
                    "row {row}: {} feature values, the encoder takes {features} x {frames}",
                    f.len()
                ));
            }
            if prompt.is_empty() {
                return Err(format!("row {row}: an empty decoder prompt"));
            }
            data.extend_from_slice(f);
        }
        let mut outputs = worker.run(
            m.encoder,
            vec![Input::new(
                "input_features",
                vec![n as i64, features as i64, frames as i64],
                Data::F32(data),
            )],
        )?;
        let shape = read_f32("last_hidden_state", &outputs["last_hidden_state"])?.shape;
        let len = match shape[..] {
            [b, len, h] if b as usize == n && h as usize == m.hidden && len > 0 => len as usize,
            _ => {
                return Err(format!(
                    "the encoder's `last_hidden_state` has shape {shape:?}"
                ));
            }
        };
        let states = outputs
            .remove("last_hidden_state")
            .ok_or("the encoder returned no `last_hidden_state`")?;
        batch.seqs = rows
            .iter()
            .map(|&(row, _, prompt)| Seq {
                row,
                ids: prompt.to_vec(),
                prefix: prompt.len(),
                fed: 0,
                done: false,
            })
            .collect();
        batch.sources = Some(Sources {
            len,
            mask: vec![1; n * len],
            states: Some(states),
            cross: Vec::new(),
        });
        Ok(batch)
    }

    /// Feeds every sequence's pending ids in one call and returns the logits of each one's
    /// next token ([seqs, vocabulary], flat) and the vocabulary size. The cache stays in the
    /// batch for the next step.
    pub fn step(
        &self,
        worker: &mut Worker,
        batch: &mut Batch,
        pad: i64,
    ) -> Result<(Vec<f32>, usize), String> {
        if batch.is_empty() {
            return Ok((Vec::new(), 0));
        }
        match self {
            Model::DecoderOnly(m) => step_decoder_only(m, worker, batch, pad),
            Model::Seq2Seq(m) => step_seq2seq(m, worker, batch),
        }
    }
}

fn step_decoder_only(
    m: &DecoderOnly,
    worker: &mut Worker,
    b: &mut Batch,
    pad: i64,
) -> Result<(Vec<f32>, usize), String> {
    let n = b.len();
    // Without a cache every step feeds the whole sequence.
    if m.cache.is_none() {
        for s in b.seqs.iter_mut() {
            s.fed = 0;
        }
        b.masks = vec![Vec::new(); n];
        b.positions = 0;
    }
    let past = b.positions;
    let steps = b
        .seqs
        .iter()
        .map(|s| s.ids.len() - s.fed)
        .max()
        .unwrap_or(0);
    if steps == 0 {
        return Err("no sequence has a token to feed".into());
    }
    let total = past + steps;
    // Each sequence's pending ids, left-padded to the longest.
    let mut ids = Vec::with_capacity(n * steps);
    let mut mask = Vec::with_capacity(n * total);
    for (s, m) in b.seqs.iter().zip(b.masks.iter_mut()) {
        let pending = &s.ids[s.fed..];
        let padding = steps - pending.len();
        ids.extend(std::iter::repeat_n(pad, padding));
        ids.extend_from_slice(pending);
        m.extend(std::iter::repeat_n(0, padding));
        m.extend(std::iter::repeat_n(1, pending.len()));
        mask.extend_from_slice(m);
    }
    let mut inputs = vec![
        Input::new("input_ids", vec![n as i64, steps as i64], Data::I64(ids)),
        Input::new(
            "attention_mask",
            vec![n as i64, total as i64],
            Data::I64(mask),
        ),
    ];
    if m.position_ids {
        // transformers: cumsum(mask) - 1, padding at position 1; this step's last `steps`.
        let mut positions = Vec::with_capacity(n * steps);
        for mask in &b.masks {
            let mut running = 0i64;
            for (i, &v) in mask.iter().enumerate() {
                running += v;
                if i >= past {
                    positions.push(if v == 0 { 1 } else { running - 1 });
                }
            }
        }
        inputs.push(Input::new(
            "position_ids",
            vec![n as i64, steps as i64],
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
    let mut ready = Vec::new();
    if let Some(cache) = &m.cache {
        if b.cache.is_empty() {
            inputs.extend(cache.names().map(|name| empty_past(name, n, cache)));
        } else {
            ready.extend(
                cache
                    .names()
                    .zip(&b.cache)
                    .map(|(name, v)| (name.to_string(), SessionInputValue::from(v))),
            );
        }
    }
    let mut outputs = worker.run_with(m.role, inputs, ready)?;
    let logits = last_logits(&outputs, n, steps)?;
    if let Some(cache) = &m.cache {
        b.cache = take_presents(&mut outputs, cache.present_names(), cache, n, total)?;
        b.positions = total;
    }
    for s in b.seqs.iter_mut() {
        s.fed = s.ids.len();
    }
    Ok(logits)
}

fn step_seq2seq(
    m: &Seq2Seq,
    worker: &mut Worker,
    b: &mut Batch,
) -> Result<(Vec<f32>, usize), String> {
    let n = b.len();
    if m.shared_cross {
        // The decoder splits its sequences into equal runs, one per source row, in order; the
        // first step makes each row's cache from its one sequence.
        let places = b.source_rows(true);
        let rows = places.last().map_or(1, |p| p + 1);
        let per = n / rows;
        if per * rows != n
            || (b.cache.is_empty() && per != 1)
            || places.iter().enumerate().any(|(i, &p)| p != i / per)
        {
            return Err(format!(
                "{n} sequences of {rows} rows cannot share their rows' cross-attention caches"
            ));
        }
    }
    let src = b
        .sources
        .as_mut()
        .ok_or("an encoder-decoder batch without its sources")?;
    if m.cache.is_none() {
        for s in b.seqs.iter_mut() {
            s.fed = 0;
        }
    }
    let first = b.cache.is_empty();
    let past = b.seqs[0].fed;
    let steps = b.seqs[0].ids.len() - past;
    if steps == 0
        || b.seqs
            .iter()
            .any(|s| s.fed != past || s.ids.len() - past != steps)
    {
        return Err("sequences stepped together must have the same decoder length".into());
    }
    let ids: Vec<i64> = b
        .seqs
        .iter()
        .flat_map(|s| s.ids[past..].iter().copied())
        .collect();
    let mut inputs = vec![Input::new(
        "input_ids",
        vec![n as i64, steps as i64],
        Data::I64(ids),
    )];
    if m.cross_mask {
        inputs.push(Input::new(
            "encoder_attention_mask",
            vec![n as i64, src.len as i64],
            Data::I64(src.mask.clone()),
        ));
    }
    let role = if first {
        m.decoder
    } else {
        m.decoder_with_past.unwrap_or(m.decoder)
    };
    let mut ready: Vec<(String, SessionInputValue<'_>)> = Vec::new();
    if first || m.decoder_with_past.is_none() {
        let states = src.states.as_ref().ok_or("the encoder's states are gone")?;
        ready.push(("encoder_hidden_states".into(), states.into()));
    }
    if m.use_cache_branch {
        inputs.push(Input::new(
            "use_cache_branch",
            vec![1],
            Data::Bool(vec![!first]),
        ));
    }
    if let (Some(cache), Some(cross)) = (&m.cache, &m.cross) {
        if first && m.use_cache_branch {
            inputs.extend(cache.names().map(|name| empty_past(name, n, cache)));
            inputs.extend(cross.names().map(|name| empty_past(name, n, cross)));
        } else if !first {
            ready.extend(
                cache
                    .names()
                    .zip(&b.cache)
                    .chain(cross.names().zip(&src.cross))
                    .map(|(name, v)| (name.to_string(), SessionInputValue::from(v))),
            );
        }
    }
    let mut outputs = worker.run_with(role, inputs, ready)?;
    let logits = last_logits(&outputs, n, steps)?;
    if let Some(cache) = &m.cache {
        b.cache = take_presents(&mut outputs, cache.present_names(), cache, n, past + steps)?;
        b.positions = past + steps;
    }
    if let (Some(cross), true) = (&m.cross, first) {
        src.cross = take_presents(&mut outputs, cross.present_names(), cross, n, src.len)?;
        // Split exports' later decoder takes the cross cache instead of the states.
        if m.decoder_with_past.is_some() {
            src.states = None;
        }
    }
    for s in b.seqs.iter_mut() {
        s.fed = s.ids.len();
    }
    Ok(logits)
}
