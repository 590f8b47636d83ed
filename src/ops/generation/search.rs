//! Greedy and beam search over a [`Model`], as `transformers`' `generate` does them
//! (`generation/utils.py: _sample` without sampling, and `_beam_search` of 4.57: top
//! `max(2, 1 + #eos) * num_beams` continuations, finished hypotheses scored with
//! `length_penalty`, `early_stopping` true / false / "never" and its heuristic).
//!
//! Rows are independent: a row's result never depends on the other rows of its batch. Rows are
//! batched continuously: a row leaves the running batch as soon as it is done, and waiting rows
//! join it (within [`Limits`]), so a long generation never holds short ones back.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::logits::{Position, Processors, Sampling, draw, log_softmax};
use super::model::{Batch, EncoderInput, Model, Seq};
use crate::runtime::pool::Worker;

/// `early_stopping` of beam search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop a row when no running beam can beat its worst finished one, judged at the current
    /// length (transformers' default, `False`).
    #[default]
    Heuristic,
    /// Stop a row as soon as it has `num_beams` finished hypotheses (`True`).
    Done,
    /// Judge running beams at the longest length they could reach (`"never"`).
    Never,
}

/// How to search and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// 1 = greedy.
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub max_new_tokens: usize,
    /// Any of these ends a sequence (it is kept as its last token).
    pub eos_token_ids: Vec<i64>,
    /// Pads prompts of a batch (decoder-only) and sources (encoder-decoder).
    pub pad_token_id: i64,
    /// Encoder-decoder models: the decoder's first token.
    pub decoder_start_token_id: i64,
    pub processors: Processors,
    /// Sample instead of taking the best token (greedy only).
    pub sampling: Option<Sampling>,
    /// `stop_strings`: a sequence ends once its generated text contains one of them.
    pub stop_strings: Option<StopStrings>,
}

/// Token ids to text (the model's tokenizer, special tokens kept).
pub type Decode = Arc<dyn Fn(&[i64]) -> String + Send + Sync>;

/// `stop_strings`, with the model's tokenizer to see the generated text.
#[derive(Clone)]
pub struct StopStrings {
    strings: Vec<String>,
    decode: Decode,
    /// Trailing tokens decoded at each step: enough for the longest string (a character can
    /// take four byte-level tokens) and a token on each side of it.
    window: usize,
}

impl StopStrings {
    /// None when `strings` has none (empty strings are ignored).
    pub fn new(strings: &[String], decode: Decode) -> Option<StopStrings> {
        let strings: Vec<String> = strings.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = strings.iter().map(|s| s.chars().count()).max()?;
        Some(StopStrings {
            strings,
            decode,
            window: 4 * longest + 2,
        })
    }

    /// Whether the text of `generated` ends a stop string with its last token. Checked after
    /// every token, so a string completed earlier has already stopped the sequence.
    fn hit(&self, generated: &[i64]) -> bool {
        let tail = &generated[generated.len().saturating_sub(self.window)..];
        let text = (self.decode)(tail);
        self.strings.iter().any(|s| text.contains(s.as_str()))
    }
}

impl std::fmt::Debug for StopStrings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.strings).finish()
    }
}

impl PartialEq for StopStrings {
    fn eq(&self, other: &Self) -> bool {
        self.strings == other.strings
    }
}

/// How much one call holds in flight: rows join the running batch while both bounds hold (a
/// row alone may exceed them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows generating at once.
    pub rows: usize,
    /// Cache positions held at once over every sequence (each beam counts), padding included,
    /// at the most the running rows can reach: bounds the KV cache's memory.
    pub tokens: usize,
}

impl Limits {
    /// Every row at once.
    pub const ALL: Limits = Limits {
        rows: usize::MAX,
        tokens: usize::MAX,
    };
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It generated an end-of-sequence token.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
    /// Its text contains one of the stop strings.
    Stop,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The new tokens (an encoder-decoder's start token excluded; a final EOS included).
    pub tokens: Vec<i64>,
    /// Beam search: the sum of its log-probabilities over `len^length_penalty`.
    pub score: Option<f32>,
    pub finish: Finish,
}

impl Search {
    fn position<'a>(&'a self, seq: &'a Seq) -> Position<'a> {
        Position {
            ids: &seq.ids,
            prefix: seq.prefix,
            max_length: seq.prefix + self.max_new_tokens,
            eos_token_ids: &self.eos_token_ids,
        }
    }

    /// Why a sequence whose new tokens are `generated` ends if it continues with `token`, if it
    /// does (the tokens are only copied to look for stop strings).
    fn finish_of(&self, generated: &[i64], token: i64) -> Option<Finish> {
        if self.eos_token_ids.contains(&token) {
            Some(Finish::Eos)
        } else if generated.len() + 1 >= self.max_new_tokens {
            Some(Finish::Length)
        } else if let Some(stop) = &self.stop_strings
            && stop.hit(&[generated, &[token]].concat())
        {
            Some(Finish::Stop)
        } else {
            None
        }
    }

    /// Checks what cannot work whatever the prompts.
    pub fn check(&self) -> Result<(), String> {
        if self.num_beams == 0 {
            return Err("num_beams must be at least 1".into());
        }
        if self.sampling.is_some() && self.num_beams > 1 {
            return Err("sampling runs with num_beams 1 (beam sampling is not implemented)".into());
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return Err(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        Ok(())
    }
}

/// Generates for each prompt (token ids, none empty): `num_return_sequences` hypotheses per
/// prompt, best first. Every row runs at once; [`generate_within`] bounds what runs at once.
pub fn generate(
    worker: &mut Worker,
    model: &Model,
    prompts: &[Vec<i64>],
    search: &Search,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    generate_within(worker, model, prompts, search, Limits::ALL)
}

/// A row's search state while it runs.
enum RowSearch {
    /// Greedy or sampling (with the row's generator).
    Greedy(Option<Box<ChaCha8Rng>>),
    Beams(Beams),
}

/// One row's beam search state.
struct Beams {
    /// The running beams' scores (sums of log-probabilities), in the batch's order.
    scores: Vec<f32>,
    /// Finished hypotheses, best first, at most `num_beams`.
    finished: Vec<(f32, Vec<i64>, Finish)>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`.
    improvable: bool,
}

/// What rows generate from.
#[derive(Debug, Clone, Copy)]
pub enum Prompts<'a> {
    /// Token ids (none empty): a decoder-only prompt, or an encoder-decoder's source text.
    Tokens(&'a [Vec<i64>]),
    /// Encoder features (speech: a log-mel window, features x frames, per row) and each row's
    /// decoder prompt (none empty).
    Features {
        features: &'a [&'a [f32]],
        decoder: &'a [Vec<i64>],
    },
}

impl Prompts<'_> {
    fn len(&self) -> usize {
        match self {
            Prompts::Tokens(p) => p.len(),
            Prompts::Features { decoder, .. } => decoder.len(),
        }
    }

    /// A row's prompt tokens (decoder-only, text encoders) or decoder prompt (features).
    fn tokens(&self, row: usize) -> &[i64] {
        match self {
            Prompts::Tokens(p) => &p[row],
            Prompts::Features { decoder, .. } => &decoder[row],
        }
    }

    /// The source positions a row's cross-attention holds, or its prompt length.
    fn cost_len(&self, row: usize, model: &Model) -> usize {
        match (self, model) {
            (Prompts::Features { .. }, Model::Seq2Seq(m)) => match m.input {
                EncoderInput::Features { positions, .. } => positions,
                EncoderInput::Tokens => 0,
            },
            _ => self.tokens(row).len(),
        }
    }
}

/// [`generate`] with continuous batching: at most `limits` run at once; when rows finish,
/// waiting rows (in the order given) join the running batch. Decoder-only rows join the one
/// running batch (its cache left-padded); an encoder-decoder's decoder takes no mask over its
/// own positions, so rows that start later run as their own batch until it empties.
pub fn generate_within(
    worker: &mut Worker,
    model: &Model,
    prompts: &[Vec<i64>],
    search: &Search,
    limits: Limits,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    generate_from(worker, model, Prompts::Tokens(prompts), search, limits)
}

/// [`generate_within`] from token prompts or encoder features.
pub fn generate_from(
    worker: &mut Worker,
    model: &Model,
    prompts: Prompts<'_>,
    search: &Search,
    limits: Limits,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    search.check()?;
    if let Some(i) = (0..prompts.len()).find(|&i| prompts.tokens(i).is_empty()) {
        return Err(format!("prompt {i} has no tokens"));
    }
    if let Prompts::Features { features, decoder } = prompts
        && features.len() != decoder.len()
    {
        return Err("features and decoder prompts differ in number".into());
    }
    if search.max_new_tokens == 0 {
        let none = Hypothesis {
            tokens: Vec::new(),
            score: None,
            finish: Finish::Length,
        };
        return Ok(vec![vec![none; search.num_return_sequences]; prompts.len()]);
    }
    let mut run = Run {
        worker,
        model,
        prompts,
        search,
        limits: Limits {
            rows: limits.rows.max(1),
            tokens: limits.tokens,
        },
        out: vec![Vec::new(); prompts.len()],
        rows: (0..prompts.len()).map(|_| None).collect(),
        waiting: (0..prompts.len()).collect(),
        batches: Vec::new(),
    };
    loop {
        run.admit()?;
        if run.batches.is_empty() {
            break;
        }
        for i in 0..run.batches.len() {
            let mut batch = std::mem::replace(&mut run.batches[i], Batch::empty());
            run.step(&mut batch)?;
            run.batches[i] = batch;
        }
        run.batches.retain(|b| !b.is_empty());
    }
    Ok(run.out)
}

struct Run<'a> {
    worker: &'a mut Worker,
    model: &'a Model,
    prompts: Prompts<'a>,
    search: &'a Search,
    limits: Limits,
    out: Vec<Vec<Hypothesis>>,
    rows: Vec<Option<RowSearch>>,
    waiting: VecDeque<usize>,
    /// Running batches (decoder-only: at most one).
    batches: Vec<Batch>,
}

/// The most cache positions `seqs` sequences of `rows` rows can come to hold together: each
/// holds `positions` self-attention positions and may add `remaining`; the cross-attention
/// cache, `source` positions, is each sequence's or, when the model shares it between a row's
/// sequences, each row's.
fn projected(
    model: &Model,
    (seqs, rows): (usize, usize),
    positions: usize,
    source: usize,
    remaining: usize,
) -> usize {
    let holders = if model.shares_sources() { rows } else { seqs };
    seqs.saturating_mul(positions + remaining)
        .saturating_add(holders.saturating_mul(source))
}

impl Run<'_> {
    fn remaining(&self, batch: &Batch) -> usize {
        let least = batch
            .seqs
            .iter()
            .map(|s| s.generated().len())
            .min()
            .unwrap_or(0);
        self.search.max_new_tokens.saturating_sub(least)
    }

    /// Starts waiting rows while the limits hold: once nothing runs, or once a quarter of the
    /// rows have left (joining costs a copy of the running cache, so rows join in groups).
    fn admit(&mut self) -> Result<(), String> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let beams = self.search.num_beams;
        let running: usize = self.batches.iter().map(|b| b.len() / beams).sum();
        let free = self.limits.rows.saturating_sub(running);
        if free == 0 || (running > 0 && free < (self.limits.rows / 4).max(1)) {
            return Ok(());
        }
        let decoder_only = matches!(self.model, Model::DecoderOnly(_));
        // What stays as it is, and the batch new rows join (decoder-only).
        let joined = if decoder_only {
            self.batches.first()
        } else {
            None
        };
        let others: usize = self
            .batches
            .iter()
            .skip(usize::from(joined.is_some()))
            .map(|b| {
                let held = (b.len(), b.rows());
                projected(
                    self.model,
                    held,
                    b.positions(),
                    b.source_len(),
                    self.remaining(b),
                )
            })
            .sum();
        let (mut seqs, mut rows, mut longest, mut remaining) = match joined {
            Some(b) => (b.len(), b.rows(), b.positions(), self.remaining(b)),
            None => (0, 0, 0, 0),
        };
        remaining = remaining.max(self.search.max_new_tokens);
        let mut admitted = Vec::new();
        while let Some(&row) = self.waiting.front() {
            if admitted.len() == free {
                break;
            }
            let len = self.prompts.cost_len(row, self.model);
            let (s, r, l) = (seqs + beams, rows + 1, longest.max(len));
            let cost = if decoder_only {
                others.saturating_add(projected(self.model, (s, r), l, 0, remaining))
            } else {
                // Its own batch: the decoder's positions plus the source's.
                others.saturating_add(projected(self.model, (s, r), 1, l, remaining))
            };
            if cost > self.limits.tokens && (running > 0 || !admitted.is_empty()) {
                break;
            }
            (seqs, rows, longest) = (s, r, l);
            admitted.push(row);
            self.waiting.pop_front();
        }
        if admitted.is_empty() {
            return Ok(());
        }
        let all = self.prompts;
        for &row in &admitted {
            self.rows[row] = Some(if beams == 1 {
                RowSearch::Greedy(self.search.sampling.as_ref().map(|s| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (s.seed, all.tokens(row)).hash(&mut h);
                    Box::new(ChaCha8Rng::seed_from_u64(h.finish()))
                }))
            } else {
                // transformers starts every beam but the first at -1e9, so the first step's
                // continuations all come from the first beam: one sequence until then.
                RowSearch::Beams(Beams {
                    scores: vec![0.0],
                    finished: Vec::new(),
                    improvable: true,
                })
            });
        }
        // The first step runs over whole prompts, where padding costs the most: rows of
        // similar lengths run together, then join the running batch at once.
        let mut started = Vec::new();
        for group in prefill_groups(&admitted, |r| all.tokens(r).len()) {
            let mut batch = match all {
                Prompts::Tokens(p) => {
                    let prompts: Vec<(usize, &[i64])> =
                        group.iter().map(|&r| (r, p[r].as_slice())).collect();
                    self.model.start(
                        self.worker,
                        &prompts,
                        self.search.decoder_start_token_id,
                        self.search.pad_token_id,
                    )?
                }
                Prompts::Features { features, decoder } => {
                    let rows: Vec<(usize, &[f32], &[i64])> = group
                        .iter()
                        .map(|&r| (r, features[r], decoder[r].as_slice()))
                        .collect();
                    self.model.start_features(self.worker, &rows)?
                }
            };
            self.step(&mut batch)?;
            started.push(batch);
        }
        let mut started = started.into_iter().filter(|b| !b.is_empty());
        let Some(mut joined) = started.next() else {
            return Ok(());
        };
        joined.merge(self.model, started.collect())?;
        match self
            .batches
            .iter()
            .position(|b| b.can_merge(&joined, self.model))
        {
            Some(i) => self.batches[i].merge(self.model, vec![joined]),
            None => {
                self.batches.push(joined);
                Ok(())
            }
        }
    }

    /// One step of a batch: the model's logits, each row's search, and the batch that
    /// continues (finished rows gone, beams reordered).
    fn step(&mut self, batch: &mut Batch) -> Result<(), String> {
        let (logits, vocab) = self
            .model
            .step(self.worker, batch, self.search.pad_token_id)?;
        let mut picks: Vec<(usize, i64)> = Vec::with_capacity(batch.len());
        // Sequences of rows that are done, in place among the picks (see below).
        let pad = self.search.pad_token_id;
        let mut finished = 0;
        let mut i = 0;
        while i < batch.len() {
            let row = batch.seqs[i].row;
            let end = i + batch.seqs[i..].iter().take_while(|s| s.row == row).count();
            if batch.seqs[i].done {
                picks.extend((i..end).map(|k| (k, pad)));
                finished += end - i;
                i = end;
                continue;
            }
            let seqs = &batch.seqs[i..end];
            let logits = &logits[i * vocab..end * vocab];
            let state = self.rows[row]
                .as_mut()
                .expect("a running row has its state");
            let done = match state {
                RowSearch::Greedy(rng) => {
                    greedy_step(self.search, &seqs[0], logits, rng).map(|(token, finish)| {
                        match finish {
                            Some(finish) => {
                                let mut tokens = seqs[0].generated().to_vec();
                                tokens.push(token);
                                Some(vec![Hypothesis {
                                    tokens,
                                    score: None,
                                    finish,
                                }])
                            }
                            None => {
                                picks.push((i, token));
                                None
                            }
                        }
                    })
                }
                RowSearch::Beams(beams) => {
                    beam_step(self.search, beams, seqs, logits, vocab).map(|next| match next {
                        Some(next) => {
                            picks.extend(next.into_iter().map(|(b, t)| (i + b, t)));
                            None
                        }
                        None => Some(
                            std::mem::take(&mut beams.finished)
                                .into_iter()
                                .take(self.search.num_return_sequences)
                                .map(|(score, tokens, finish)| Hypothesis {
                                    tokens,
                                    score: Some(score),
                                    finish,
                                })
                                .collect(),
                        ),
                    })
                }
            }?;
            if let Some(hyps) = done {
                self.out[row] = hyps;
                self.rows[row] = None;
                for s in &mut batch.seqs[i..end] {
                    s.done = true;
                }
                picks.extend((i..end).map(|k| (k, pad)));
                finished += end - i;
            }
            i = end;
        }
        // An encoder-decoder batch holds every sequence's sources (the cross-attention cache:
        // 18 MB a sequence for Whisper tiny), which move whenever sequences leave. Done rows
        // keep their places, stepping on padding, while fewer than a quarter of the batch are
        // done and nothing else moves; then they all leave in one move.
        let keep_done = matches!(self.model, Model::Seq2Seq(_))
            && picks.len() == batch.len()
            && 4 * finished < batch.len();
        if !keep_done && finished > 0 {
            picks.retain(|&(k, _)| !batch.seqs[k].done);
        }
        batch.select(self.model, &picks)
    }
}

/// Padded prompt tokens of one first step at most (a longer prompt runs alone): the first step
/// returns logits for every prompt position (Optimum exports have no way to ask for the last
/// one only), 196 KB per token for a 49k vocabulary.
const PREFILL_TOKENS: usize = 2048;

/// Rows (sorted longest first) cut into groups whose padding to their longest row is at most
/// a fifth of their tokens, and of at most [`PREFILL_TOKENS`] padded tokens.
fn prefill_groups(rows: &[usize], len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut sorted = rows.to_vec();
    sorted.sort_by_key(|&r| std::cmp::Reverse(len(r)));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let (mut longest, mut tokens) = (0, 0);
    for r in sorted {
        let l = len(r);
        match groups.last_mut() {
            Some(g)
                if 5 * (g.len() + 1) * longest <= 6 * (tokens + l)
                    && (g.len() + 1) * longest <= PREFILL_TOKENS =>
            {
                g.push(r);
                tokens += l;
            }
            _ => {
                groups.push(vec![r]);
                (longest, tokens) = (l, l);
            }
        }
    }
    groups
}

/// A greedy (or sampled) row's next token, and whether it ends the row.
fn greedy_step(
    search: &Search,
    seq: &Seq,
    logits: &[f32],
    rng: &mut Option<Box<ChaCha8Rng>>,
) -> Result<(i64, Option<Finish>), String> {
    let mut scores = logits.to_vec();
    search.processors.apply(&search.position(seq), &mut scores);
    let token = match (&search.sampling, rng.as_mut()) {
        (Some(sampling), Some(rng)) => {
            sampling.probabilities(&mut scores);
            draw(&scores, rng.random::<f32>())
        }
        _ => crate::ops::argmax(&scores),
    } as i64;
    Ok((token, search.finish_of(seq.generated(), token)))
}

/// One step of a row's beam search, as transformers 4.57's `_beam_search`: the beams that
/// continue ((beam, token), best first, their scores kept in `beams`), or None when the row is
/// done (its hypotheses in `beams.finished`).
fn beam_step(
    search: &Search,
    beams: &mut Beams,
    parents: &[Seq],
    logits: &[f32],
    vocab: usize,
) -> Result<Option<Vec<(usize, i64)>>, String> {
    let n = search.num_beams;
    let keep = n * 2.max(1 + search.eos_token_ids.len());
    if vocab < keep {
        return Err(format!(
            "num_beams {n} needs a vocabulary of at least {keep} tokens; the model has {vocab}"
        ));
    }
    let lp = search.length_penalty as f64;
    // The best `keep` of every (beam, token)'s accumulated log-probability, ties to the lower
    // (beam, token): the best `keep` of each beam, then of those.
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(keep * parents.len());
    let mut lps = vec![0f32; vocab];
    for (beam, ((seq, score), logits)) in parents
        .iter()
        .zip(&beams.scores)
        .zip(logits.chunks_exact(vocab))
        .enumerate()
    {
        lps.copy_from_slice(logits);
        log_softmax(&mut lps);
        search.processors.apply(&search.position(seq), &mut lps);
        best_of(&lps, *score, keep, beam * vocab, &mut top);
    }
    top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    top.truncate(keep);
    let generated = parents[0].generated().len() + 1;
    let candidates: Vec<(usize, i64, f32, Option<Finish>)> = top
        .iter()
        .map(|&(score, i)| {
            let (beam, token) = (i / vocab, (i % vocab) as i64);
            let finish = search.finish_of(parents[beam].generated(), token);
            (beam, token, score, finish)
        })
        .collect();
    // Finished: only among the first `num_beams` candidates, and only while the row can still
    // take them.
    let full = beams.finished.len() == n && search.early_stopping == EarlyStopping::Done;
    if beams.improvable && !full {
        let penalty = (generated as f64).powf(lp) as f32;
        for &(beam, token, score, finish) in candidates.iter().take(n) {
            if let Some(finish) = finish {
                let mut ids = parents[beam].generated().to_vec();
                ids.push(token);
                let score = score / penalty;
                let at = beams
                    .finished
                    .iter()
                    .position(|(s, _, _)| *s < score)
                    .unwrap_or(beams.finished.len());
                beams.finished.insert(at, (score, ids, finish));
                beams.finished.truncate(n);
            }
        }
    }
    // Running: the best `num_beams` candidates, those that hit a stop pushed last.
    let mut next: Vec<(usize, i64, f32)> = candidates
        .iter()
        .map(|&(b, t, s, f)| (b, t, if f.is_some() { s - 1.0e9 } else { s }))
        .collect();
    next.sort_by(|a, b| b.2.total_cmp(&a.2));
    next.truncate(n);
    let all_hit = candidates.iter().all(|c| c.3.is_some());
    beams.scores = next.iter().map(|c| c.2).collect();
    // transformers' _check_early_stop_heuristic, at the new length.
    if beams.finished.len() == n {
        let length = if search.early_stopping == EarlyStopping::Never && lp > 0.0 {
            search.max_new_tokens
        } else {
            generated
        };
        let best_running = beams.scores[0] / (length as f64).powf(lp) as f32;
        let worst_finished = beams.finished.last().map_or(f32::NEG_INFINITY, |f| f.0);
        beams.improvable &= best_running > worst_finished;
    }
    let done = !beams.improvable
        || (beams.finished.len() == n && search.early_stopping == EarlyStopping::Done)
        || all_hit;
    Ok((!done).then(|| next.into_iter().map(|(b, t, _)| (b, t)).collect()))
}

/// Appends the `keep` largest of `lps[t] + score` as (value, `offset + t`), largest first, ties
/// to the lower index: one pass with a short sorted list instead of sorting the vocabulary.
fn best_of(lps: &[f32], score: f32, keep: usize, offset: usize, out: &mut Vec<(f32, usize)>) {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(keep + 1);
    for (t, &l) in lps.iter().enumerate() {
        let v = l + score;
        if best.len() == keep && v.total_cmp(&best[keep - 1].0) != std::cmp::Ordering::Greater {
            continue;
        }
        // After every kept value at least as large (earlier indices win ties).
        let at = best
            .iter()
            .rposition(|b| b.0.total_cmp(&v) != std::cmp::Ordering::Less)
            .map_or(0, |i| i + 1);
        best.insert(at, (v, offset + t));
        best.truncate(keep);
    }
    out.extend(best);
}

#[cfg(test)]
mod tests {
    use super::super::logits::top_k;
    use super::*;

    /// Each beam's best, then the best of those, rank as a sort of every (beam, token) does.
    #[test]
    fn beam_candidates_are_the_best_of_all() {
        let rows = [
            [0.5f32, -1.0, 0.5, 2.0, f32::NEG_INFINITY, 0.1],
            [0.2, 0.5, 0.5, -3.0, 1.0, 0.5],
        ];
        let scores = [-1.0f32, -0.5];
        for keep in 1..=6 {
            let mut top = Vec::new();
            for (b, row) in rows.iter().enumerate() {
                best_of(row, scores[b], keep, b * 6, &mut top);
            }
            top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            top.truncate(keep);
            let all: Vec<f32> = rows
                .iter()
                .zip(scores)
                .flat_map(|(r, s)| r.iter().map(move |l| l + s))
                .collect();
            let want: Vec<(f32, usize)> =
                top_k(&all, keep).into_iter().map(|i| (all[i], i)).collect();
            assert_eq!(top, want, "keep {keep}");
        }
    }

    /// Prompts start in groups of similar lengths, none over the prefill bound but a prompt
    /// longer than it, alone.
    #[test]
    fn prefill_groups_pad_little_and_stay_bounded() {
        let lens = [100, 10, 95, 12, 90, 3000, 11, 100];
        let groups = prefill_groups(&(0..lens.len()).collect::<Vec<_>>(), |r| lens[r]);
        assert_eq!(groups, vec![vec![5], vec![0, 7, 2, 4], vec![3, 6, 1]]);
        let many = [500; 10];
        let groups = prefill_groups(&(0..10).collect::<Vec<_>>(), |r| many[r]);
        assert!(groups.iter().all(|g| g.len() * 500 <= PREFILL_TOKENS));
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 10);
    }
}
