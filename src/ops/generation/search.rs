//! Greedy and beam search over a [`Model`], as `transformers`' `generate` does them
//! (`generation/utils.py: _sample` without sampling, and `_beam_search` of 4.57: top
//! `max(2, 1 + #eos) * num_beams` continuations, finished hypotheses scored with
//! `length_penalty`, `early_stopping` true / false / "never" and its heuristic).
//!
//! Rows are independent: a row's result never depends on the other rows of its batch, and a
//! row leaves the batch as soon as it is done.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::logits::{Position, Processors, Sampling, draw, log_softmax, top_k};
use super::model::{Model, Seq};
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
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It generated an end-of-sequence token.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
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
    fn max_length(&self, seq: &Seq) -> usize {
        seq.prefix + self.max_new_tokens
    }

    fn position<'a>(&'a self, seq: &'a Seq) -> Position<'a> {
        Position {
            ids: &seq.ids,
            prefix: seq.prefix,
            max_length: self.max_length(seq),
            eos_token_ids: &self.eos_token_ids,
        }
    }

    fn finish_of(&self, seq: &Seq) -> Option<Finish> {
        let last = *seq.generated().last()?;
        if self.eos_token_ids.contains(&last) {
            Some(Finish::Eos)
        } else if seq.generated().len() >= self.max_new_tokens {
            Some(Finish::Length)
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
/// prompt, best first.
pub fn generate(
    worker: &mut Worker,
    model: &Model,
    prompts: &[Vec<i64>],
    search: &Search,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    search.check()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let starts = model.start(
        worker,
        prompts,
        search.decoder_start_token_id,
        search.pad_token_id,
    )?;
    if search.max_new_tokens == 0 {
        return Ok(starts
            .iter()
            .map(|_| {
                vec![
                    Hypothesis {
                        tokens: Vec::new(),
                        score: None,
                        finish: Finish::Length,
                    };
                    search.num_return_sequences
                ]
            })
            .collect());
    }
    if search.num_beams == 1 {
        greedy(worker, model, starts, search)
    } else {
        beam(worker, model, starts, search)
    }
}

fn greedy(
    worker: &mut Worker,
    model: &Model,
    starts: Vec<Seq>,
    search: &Search,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    let mut out: Vec<Vec<Hypothesis>> = vec![Vec::new(); starts.len()];
    // Sampling: a generator per row, seeded with the seed and the row's prompt.
    let mut rngs: Vec<Option<ChaCha8Rng>> = starts
        .iter()
        .map(|seq| {
            search.sampling.as_ref().map(|s| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (s.seed, &seq.ids, seq.prefix).hash(&mut h);
                ChaCha8Rng::seed_from_u64(h.finish())
            })
        })
        .collect();
    let mut rows: Vec<usize> = (0..starts.len()).collect();
    let mut seqs = starts;
    while !seqs.is_empty() {
        let (logits, vocab) = model.step(worker, &mut seqs, search.pad_token_id)?;
        let mut kept_rows = Vec::with_capacity(rows.len());
        let mut kept = Vec::with_capacity(seqs.len());
        for ((row, mut seq), scores) in rows.into_iter().zip(seqs).zip(logits.chunks_exact(vocab)) {
            let mut scores = scores.to_vec();
            search.processors.apply(&search.position(&seq), &mut scores);
            let token = match (&search.sampling, rngs[row].as_mut()) {
                (Some(sampling), Some(rng)) => {
                    sampling.probabilities(&mut scores);
                    draw(&scores, rng.random::<f32>())
                }
                _ => crate::ops::argmax(&scores),
            };
            seq.push(token as i64);
            match search.finish_of(&seq) {
                Some(finish) => {
                    out[row] = vec![Hypothesis {
                        tokens: seq.generated().to_vec(),
                        score: None,
                        finish,
                    }]
                }
                None => {
                    kept_rows.push(row);
                    kept.push(seq);
                }
            }
        }
        rows = kept_rows;
        seqs = kept;
    }
    Ok(out)
}

/// One row's beam search state.
struct Beams {
    row: usize,
    /// Running beams and their scores (sums of log-probabilities), best first.
    running: Vec<(Seq, f32)>,
    /// Finished hypotheses, best first, at most `num_beams`.
    finished: Vec<(f32, Vec<i64>, Finish)>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`.
    improvable: bool,
}

fn beam(
    worker: &mut Worker,
    model: &Model,
    starts: Vec<Seq>,
    search: &Search,
) -> Result<Vec<Vec<Hypothesis>>, String> {
    let beams = search.num_beams;
    let keep = beams * 2.max(1 + search.eos_token_ids.len());
    let lp = search.length_penalty as f64;
    let mut out: Vec<Vec<Hypothesis>> = vec![Vec::new(); starts.len()];
    // The first step runs each row once: transformers starts every beam but the first at -1e9,
    // so the first step's continuations all come from the first beam.
    let mut rows: Vec<Beams> = starts
        .into_iter()
        .enumerate()
        .map(|(row, seq)| Beams {
            row,
            running: vec![(seq, 0.0)],
            finished: Vec::new(),
            improvable: true,
        })
        .collect();
    while !rows.is_empty() {
        let mut seqs: Vec<Seq> = rows
            .iter_mut()
            .flat_map(|r| {
                r.running
                    .iter_mut()
                    .map(|(s, _)| std::mem::replace(s, Seq::prompt(Vec::new())))
            })
            .collect();
        let (logits, vocab) = model.step(worker, &mut seqs, search.pad_token_id)?;
        if vocab < keep {
            return Err(format!(
                "num_beams {beams} needs a vocabulary of at least {keep} tokens; the model has {vocab}"
            ));
        }
        let mut seqs = seqs.into_iter();
        let mut logits = logits.chunks_exact(vocab);
        let mut kept = Vec::with_capacity(rows.len());
        for mut r in rows {
            // Accumulated log-probabilities of every (beam, token).
            let mut parents = Vec::with_capacity(r.running.len());
            let mut all = Vec::with_capacity(r.running.len() * vocab);
            for (_, score) in &r.running {
                let seq = seqs.next().expect("one sequence per running beam");
                let mut lps = logits.next().expect("logits per sequence").to_vec();
                log_softmax(&mut lps);
                search.processors.apply(&search.position(&seq), &mut lps);
                all.extend(lps.iter().map(|&l| l + score));
                parents.push(seq);
            }
            let top = top_k(&all, keep);
            let generated = parents[0].generated().len() + 1;
            let candidates: Vec<(usize, i64, f32, bool)> = top
                .iter()
                .map(|&i| {
                    let (beam, token) = (i / vocab, (i % vocab) as i64);
                    let hits =
                        search.eos_token_ids.contains(&token) || generated >= search.max_new_tokens;
                    (beam, token, all[i], hits)
                })
                .collect();
            // Finished: only among the first `num_beams` candidates, and only while the row can
            // still take them.
            let full = r.finished.len() == beams && search.early_stopping == EarlyStopping::Done;
            if r.improvable && !full {
                let penalty = (generated as f64).powf(lp) as f32;
                for &(beam, token, score, hits) in candidates.iter().take(beams) {
                    if hits {
                        let mut ids = parents[beam].generated().to_vec();
                        ids.push(token);
                        let finish = if search.eos_token_ids.contains(&token) {
                            Finish::Eos
                        } else {
                            Finish::Length
                        };
                        let score = score / penalty;
                        let at = r
                            .finished
                            .iter()
                            .position(|(s, _, _)| *s < score)
                            .unwrap_or(r.finished.len());
                        r.finished.insert(at, (score, ids, finish));
                        r.finished.truncate(beams);
                    }
                }
            }
            // Running: the best `num_beams` candidates, those that hit a stop pushed last.
            let mut next: Vec<(usize, i64, f32, f32)> = candidates
                .iter()
                .map(|&(b, t, s, hits)| (b, t, s, if hits { s - 1.0e9 } else { s }))
                .collect();
            next.sort_by(|a, b| b.3.total_cmp(&a.3));
            next.truncate(beams);
            let all_hit = candidates.iter().all(|c| c.3);
            r.running = next
                .into_iter()
                .map(|(b, t, _, adjusted)| (parents[b].child(t), adjusted))
                .collect();
            // transformers' _check_early_stop_heuristic, at the new length.
            if r.finished.len() == beams {
                let length = if search.early_stopping == EarlyStopping::Never && lp > 0.0 {
                    search.max_new_tokens
                } else {
                    generated
                };
                let best_running = r.running[0].1 / (length as f64).powf(lp) as f32;
                let worst_finished = r.finished.last().map_or(f32::NEG_INFINITY, |f| f.0);
                r.improvable &= best_running > worst_finished;
            }
            let done = !r.improvable
                || (r.finished.len() == beams && search.early_stopping == EarlyStopping::Done)
                || all_hit;
            if done {
                out[r.row] = r
                    .finished
                    .into_iter()
                    .take(search.num_return_sequences)
                    .map(|(score, tokens, finish)| Hypothesis {
                        tokens,
                        score: Some(score),
                        finish,
                    })
                    .collect();
            } else {
                kept.push(r);
            }
        }
        rows = kept;
    }
    Ok(out)
}
