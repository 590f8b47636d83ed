//! Logits processors, in the order and with the semantics of `transformers`' `generate`
//! (`generation/utils.py: _get_logits_processor`, `generation/logits_process.py`), applied to one
//! sequence's next-token scores with the ids it has so far (its prompt or decoder prefix
//! included, never padding: a sequence's result does not depend on its batch).

use std::collections::HashSet;

/// The processors that change which tokens can come next. Unset fields do nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Processors {
    /// `repetition_penalty`: scores of tokens already in the sequence are divided by it
    /// (multiplied when negative).
    pub repetition_penalty: Option<f32>,
    /// `no_repeat_ngram_size`: a token that would repeat an n-gram of the sequence is banned.
    pub no_repeat_ngram_size: Option<usize>,
    /// `bad_words_ids`: token sequences never generated (single-token EOS entries are ignored,
    /// as transformers ignores them).
    pub bad_words_ids: Vec<Vec<i64>>,
    /// `min_length`: EOS banned while the sequence (prompt or decoder prefix included) is
    /// shorter.
    pub min_length: Option<usize>,
    /// `min_new_tokens`: EOS banned until this many tokens are generated.
    pub min_new_tokens: Option<usize>,
    /// `forced_bos_token_id`: the only token allowed when the sequence has one token.
    pub forced_bos_token_id: Option<i64>,
    /// `forced_eos_token_id`: the only tokens allowed at the last step before `max_length`.
    pub forced_eos_token_ids: Vec<i64>,
    /// `suppress_tokens`: never generated.
    pub suppress_tokens: Vec<i64>,
    /// `begin_suppress_tokens`: not generated as the first new token.
    pub begin_suppress_tokens: Vec<i64>,
    /// Whisper's timestamp rules (`WhisperTimeStampLogitsProcessor`), applied last.
    pub timestamps: Option<TimestampRules>,
}

/// Whisper's rules for timestamp tokens (every id from `<|notimestamps|>` + 1 up): the first
/// new token is a timestamp (at most `max_initial_timestamp_index` steps in), timestamps come in
/// pairs except right before the end, never go back, and a timestamp is forced when the
/// timestamps together are likelier than any text token.
#[derive(Debug, Clone, PartialEq)]
pub struct TimestampRules {
    pub no_timestamps_token_id: i64,
    /// `eos_token_id`: text tokens are the ids below it.
    pub eos_token_id: i64,
    pub max_initial_timestamp_index: Option<usize>,
}

impl TimestampRules {
    /// The rules on one sequence's (processed) scores; `ids[prefix..]` are its new tokens.
    fn apply(&self, ids: &[i64], prefix: usize, scores: &mut [f32]) {
        let n = scores.len();
        let begin = usize::try_from(self.no_timestamps_token_id + 1)
            .unwrap_or(n)
            .min(n);
        let eos = usize::try_from(self.eos_token_id).unwrap_or(0).min(n);
        ban(scores, self.no_timestamps_token_id);
        let generated = &ids[prefix.min(ids.len())..];
        let is_timestamp = |t: i64| t >= begin as i64;
        let last_was = generated.last().is_some_and(|&t| is_timestamp(t));
        let penultimate_was = generated.len() < 2 || is_timestamp(generated[generated.len() - 2]);
        if last_was {
            if penultimate_was {
                scores[begin..].fill(f32::NEG_INFINITY);
            } else {
                scores[..eos].fill(f32::NEG_INFINITY);
            }
        }
        if let Some(&last) = generated.iter().rev().find(|&&t| is_timestamp(t)) {
            // Timestamps never decrease; after a pair (or text), not the same one again.
            let last = last as usize + usize::from(!last_was || penultimate_was);
            scores[begin..last.min(n)].fill(f32::NEG_INFINITY);
        }
        if generated.is_empty() {
            scores[..begin].fill(f32::NEG_INFINITY);
            if let Some(m) = self.max_initial_timestamp_index {
                let from = (begin + m + 1).min(n);
                scores[from..].fill(f32::NEG_INFINITY);
            }
        }
        // The timestamps' total probability against the likeliest text token.
        let mut logprobs = scores.to_vec();
        log_softmax(&mut logprobs);
        let (text, stamps) = logprobs.split_at(begin);
        let max = stamps.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let timestamp = if max == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            max + stamps.iter().map(|&l| (l - max).exp()).sum::<f32>().ln()
        };
        let text = text.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if timestamp > text {
            scores[..begin].fill(f32::NEG_INFINITY);
        }
    }
}

/// Where a sequence stands when its scores are processed.
pub struct Position<'a> {
    /// Its ids so far (prompt or decoder prefix, then generated tokens).
    pub ids: &'a [i64],
    /// How many of them are the prompt / decoder prefix.
    pub prefix: usize,
    /// `max_length` in transformers' sense: prefix + max_new_tokens.
    pub max_length: usize,
    pub eos_token_ids: &'a [i64],
}

fn ban(scores: &mut [f32], token: i64) {
    if let Some(s) = usize::try_from(token).ok().and_then(|t| scores.get_mut(t)) {
        *s = f32::NEG_INFINITY;
    }
}

fn only(scores: &mut [f32], tokens: impl IntoIterator<Item = i64>) {
    let keep: Vec<(usize, f32)> = tokens
        .into_iter()
        .filter_map(|t| usize::try_from(t).ok().filter(|&t| t < scores.len()))
        .map(|t| (t, 0.0))
        .collect();
    scores.fill(f32::NEG_INFINITY);
    for (t, v) in keep {
        scores[t] = v;
    }
}

impl Processors {
    /// Applies every processor, in transformers' order, to one sequence's scores.
    pub fn apply(&self, at: &Position<'_>, scores: &mut [f32]) {
        let ids = at.ids;
        let cur_len = ids.len();
        if let Some(penalty) = self.repetition_penalty.filter(|&p| p != 1.0) {
            let seen: HashSet<i64> = ids.iter().copied().collect();
            for t in seen {
                if let Some(s) = usize::try_from(t).ok().and_then(|t| scores.get_mut(t)) {
                    *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
                }
            }
        }
        if let Some(n) = self
            .no_repeat_ngram_size
            .filter(|&n| n > 0 && cur_len + 1 >= n)
        {
            let prefix = &ids[cur_len + 1 - n..];
            for window in ids.windows(n) {
                if &window[..n - 1] == prefix {
                    ban(scores, window[n - 1]);
                }
            }
        }
        for word in &self.bad_words_ids {
            match word.as_slice() {
                [] => {}
                [t] if at.eos_token_ids.contains(t) => {}
                [t] => ban(scores, *t),
                [start @ .., last] => {
                    if ids.ends_with(start) {
                        ban(scores, *last);
                    }
                }
            }
        }
        if self.min_length.is_some_and(|m| m > 0 && cur_len < m) {
            for &eos in at.eos_token_ids {
                ban(scores, eos);
            }
        }
        if self
            .min_new_tokens
            .is_some_and(|m| m > 0 && cur_len - at.prefix < m)
        {
            for &eos in at.eos_token_ids {
                ban(scores, eos);
            }
        }
        if let Some(bos) = self.forced_bos_token_id.filter(|_| cur_len == 1) {
            only(scores, [bos]);
        }
        if !self.forced_eos_token_ids.is_empty() && cur_len + 1 == at.max_length {
            only(scores, self.forced_eos_token_ids.iter().copied());
        }
        for &t in &self.suppress_tokens {
            ban(scores, t);
        }
        if !self.begin_suppress_tokens.is_empty() {
            let begin = if at.prefix > 1 || self.forced_bos_token_id.is_none() {
                at.prefix
            } else {
                at.prefix + 1
            };
            if cur_len == begin {
                for &t in &self.begin_suppress_tokens {
                    ban(scores, t);
                }
            }
        }
        if let Some(rules) = &self.timestamps {
            rules.apply(ids, at.prefix, scores);
        }
    }
}

/// Sampling's warpers, as transformers applies them after the processors (temperature, then
/// top-k, top-p and min-p), and the seed of each row's random numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub min_p: Option<f32>,
    /// Each row draws from its own generator, seeded with this and the row's prompt: a run is
    /// reproducible and a row's result does not depend on its batch.
    pub seed: u64,
}

impl Sampling {
    /// Warps one sequence's processed scores into probabilities.
    pub fn probabilities(&self, scores: &mut [f32]) {
        if self.temperature != 1.0 {
            for s in scores.iter_mut() {
                *s /= self.temperature;
            }
        }
        if self.top_k > 0 && self.top_k < scores.len() {
            let kth = scores[*top_k(scores, self.top_k).last().expect("k > 0")];
            for s in scores.iter_mut() {
                if *s < kth {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if self.top_p < 1.0 {
            // transformers: sort ascending, drop the tokens whose cumulative probability is at
            // most 1 - top_p, keeping at least one.
            let mut probs = scores.to_vec();
            softmax(&mut probs);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let mut cumulative = 0.0f32;
            for (rank, &i) in order.iter().enumerate() {
                cumulative += probs[i];
                if cumulative <= 1.0 - self.top_p && rank + 1 < order.len() {
                    scores[i] = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(min_p) = self.min_p {
            let mut probs = scores.to_vec();
            softmax(&mut probs);
            let top = probs.iter().copied().fold(0.0, f32::max);
            let keep = crate::ops::argmax(&probs);
            for (i, (s, p)) in scores.iter_mut().zip(&probs).enumerate() {
                if *p < min_p * top && i != keep {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        softmax(scores);
    }
}

/// Draws an index from probabilities with a uniform number in [0, 1).
pub fn draw(probs: &[f32], uniform: f32) -> usize {
    let mut cumulative = 0.0f32;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cumulative += p;
            last = i;
            if uniform < cumulative {
                return i;
            }
        }
    }
    last
}

/// softmax in f32.
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// `log_softmax` in f32, as torch computes it: `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_sum = sum.ln();
    for s in scores.iter_mut() {
        *s = *s - max - log_sum;
    }
}

/// The indices of the `k` largest scores, largest first (ties: lower index first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(ids: &'a [i64], prefix: usize) -> Position<'a> {
        Position {
            ids,
            prefix,
            max_length: 10,
            eos_token_ids: &[2],
        }
    }

    #[test]
    fn no_repeat_ngram_bans_what_would_repeat_a_pair() {
        let p = Processors {
            no_repeat_ngram_size: Some(2),
            ..Default::default()
        };
        let mut s = vec![0.0; 6];
        // "3 4 ... 3" → 4 is banned after 3.
        p.apply(&at(&[3, 4, 5, 3], 1), &mut s);
        assert_eq!(s[4], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 1);
    }

    #[test]
    fn forced_tokens_and_min_length() {
        let p = Processors {
            forced_bos_token_id: Some(1),
            forced_eos_token_ids: vec![2],
            min_new_tokens: Some(2),
            ..Default::default()
        };
        let mut s = vec![0.5; 4];
        p.apply(&at(&[0], 1), &mut s);
        assert_eq!(
            s,
            [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
        let mut s = vec![0.5; 4];
        p.apply(&at(&[0, 1, 3, 3, 3, 3, 3, 3, 3], 1), &mut s);
        assert_eq!(s[2], 0.0);
        let mut s = vec![0.5; 4];
        p.apply(&at(&[0, 1], 1), &mut s);
        assert_eq!(s[2], f32::NEG_INFINITY, "EOS banned before min_new_tokens");
    }

    #[test]
    fn warpers_keep_what_transformers_keeps() {
        let warp = |top_k, top_p, min_p| {
            let mut s = vec![3.0f32, 2.0, 1.0, 0.0];
            Sampling {
                temperature: 1.0,
                top_k,
                top_p,
                min_p,
                seed: 0,
            }
            .probabilities(&mut s);
            s.iter().map(|&p| p > 0.0).collect::<Vec<_>>()
        };
        assert_eq!(warp(2, 1.0, None), [true, true, false, false]);
        // probabilities ≈ .64 .24 .09 .03: top_p .8 keeps the first two.
        assert_eq!(warp(0, 0.8, None), [true, true, false, false]);
        // min_p .3: tokens under .3 x .64 go.
        assert_eq!(warp(0, 1.0, Some(0.3)), [true, true, false, false]);
        assert_eq!(warp(0, 1.0, None), [true; 4]);
        assert_eq!(draw(&[0.0, 0.5, 0.5], 0.7), 2);
        assert_eq!(draw(&[0.0, 0.5, 0.5], 0.1), 1);
    }

    /// Whisper's timestamp rules on a vocabulary of 4 text tokens, EOS (4), <|notimestamps|>
    /// (5) and timestamps 6..=9 (0.00 s .. 0.06 s).
    #[test]
    fn timestamps_come_first_in_pairs_and_never_go_back() {
        let p = Processors {
            timestamps: Some(TimestampRules {
                no_timestamps_token_id: 5,
                eos_token_id: 4,
                max_initial_timestamp_index: Some(1),
            }),
            ..Default::default()
        };
        let allowed = |ids: &[i64], scores: [f32; 10]| {
            let mut s = scores.to_vec();
            p.apply(&at(ids, 1), &mut s);
            (0..10)
                .filter(|&i| s[i] > f32::NEG_INFINITY)
                .collect::<Vec<_>>()
        };
        let flat = [0.0; 10];
        // Text and EOS likelier than the timestamps together.
        let mut wordy = [0.0; 10];
        wordy[1] = 5.0;
        wordy[4] = 5.0;
        // First: a timestamp of at most 0.02 s.
        assert_eq!(allowed(&[0], flat), [6, 7]);
        // After the first timestamp: text or EOS.
        assert_eq!(allowed(&[0, 7], flat), [0, 1, 2, 3, 4]);
        // After text: anything but going back to 0.02.
        assert_eq!(allowed(&[0, 7, 1], wordy), [0, 1, 2, 3, 4, 8, 9]);
        // After text then <|0.04|>: its pair <|0.04|> or later, or EOS.
        assert_eq!(allowed(&[0, 7, 1, 8], wordy), [4, 8, 9]);
        // Timestamps together likelier than any text token (or EOS): text is banned.
        assert_eq!(allowed(&[0, 7, 1, 8], flat), [8, 9]);
        let mut peaked = [0.0; 10];
        peaked[6..].fill(2.0);
        assert_eq!(allowed(&[0, 7, 1], peaked), [8, 9]);
    }

    #[test]
    fn top_k_is_sorted_and_stable() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, -1.0, 0.9], 3), [4, 1, 2]);
        assert_eq!(top_k(&[0.1, 0.2], 5), [1, 0]);
    }
}
