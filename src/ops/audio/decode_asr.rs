//! Whisper's token sequences into text and timestamped segments, as the ASR pipeline's
//! `_decode_asr` (`models/whisper/tokenization_whisper.py`, transformers 4.57) does it: text
//! split at timestamp pairs, timestamps offset by the window's place in the recording (and,
//! within a long-form sequence, by the segments before), tokens of overlapping windows merged
//! by their longest common sequence, timestamps inside a window's strides left to its
//! neighbours.

use std::collections::HashSet;

use crate::ops::transcribe::Piece;

/// One window's generated tokens and, when the recording was cut into windows, its stride
/// (window length, left and right overlap, in seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowTokens {
    pub tokens: Vec<i64>,
    pub stride: Option<(f64, f64, f64)>,
}

/// What `_decode_asr` needs of the model and its tokenizer.
pub struct AsrText<'a> {
    /// `<|notimestamps|>` + 1: this and every id above are timestamps.
    pub timestamp_begin: i64,
    /// Seconds per timestamp step (`chunk_length / max_source_positions`: 0.02).
    pub time_precision: f64,
    /// Encoder positions of one window (1500).
    pub segment_size: f64,
    /// The tokenizer's `all_special_ids`: neither text nor timestamps.
    pub special: &'a HashSet<i64>,
    /// Language tokens (a special one starts a new piece when the language changes).
    pub languages: &'a HashSet<i64>,
    /// Whether segments are asked for (`return_timestamps`).
    pub timestamps: bool,
    /// Text of tokens (special tokens kept).
    pub decode: &'a dyn Fn(&[i64]) -> Result<String, String>,
}

/// A segment while it is put together.
#[derive(Default)]
struct Chunk {
    start: Option<f64>,
    end: Option<f64>,
    text: String,
}

/// Python's `round(x, 2)`: the decimal nearest the double's exact value.
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

impl AsrText<'_> {
    /// The transcript of a recording's windows, in order, and its segments (text, start, end).
    pub fn decode(&self, windows: &[WindowTokens]) -> Result<(String, Vec<Piece>), String> {
        let tb = self.timestamp_begin;
        let tp = self.time_precision;
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut chunk = Chunk::default();
        let mut time_offset = 0.0f64;
        let mut previous: Vec<Vec<i64>> = Vec::new();
        let mut skip = false;
        let mut last_language: Option<i64> = None;
        for window in windows {
            let ids = &window.tokens;
            // Timestamps in the strides are resolved by the neighbouring window.
            let mut last_timestamp: Option<i64> = None;
            let mut first_timestamp = tb as f64;
            // Long-form sequences restart their timestamps at each segment.
            let mut cur_max = 0.0f64;
            let mut prev_segments_len = 0.0f64;
            let mut penultimate = 0.0f64;
            if let Some((chunk_len, left, right)) = window.stride {
                time_offset -= left;
                let right_stride_start = chunk_len - right;
                if left != 0.0 {
                    first_timestamp = left / tp + tb as f64;
                }
                if right != 0.0 {
                    for &t in ids.iter().rev() {
                        if t >= tb {
                            if last_timestamp.is_some()
                                && ((t - tb) as f64 * tp) < right_stride_start
                            {
                                break;
                            }
                            last_timestamp = Some(t);
                        }
                    }
                }
            }
            let mut current: Vec<i64> = Vec::new();
            for (i, &t) in ids.iter().enumerate() {
                if self.special.contains(&t) {
                    if self.languages.contains(&t) {
                        if !self.timestamps && last_language.is_some_and(|l| l != t) {
                            previous.push(std::mem::take(&mut current));
                            chunk.text = (self.decode)(&longest_common_sequence(&previous))?;
                            chunks.push(std::mem::take(&mut chunk));
                            previous.clear();
                        }
                        last_language = Some(t);
                    }
                    continue;
                }
                if t < tb {
                    current.push(t);
                    continue;
                }
                let timestamp = (t - tb) as f64 * tp;
                if timestamp < cur_max {
                    // The next segment of a long-form sequence has started.
                    let single_ending = i >= 2 && !(ids[i - 1] >= tb && ids[i - 2] >= tb);
                    if single_ending {
                        prev_segments_len += tp * self.segment_size;
                    } else {
                        cur_max = penultimate;
                        prev_segments_len += penultimate;
                    }
                }
                penultimate = cur_max;
                cur_max = timestamp;
                let time = round2((t - tb) as f64 * tp + time_offset + prev_segments_len);
                if last_timestamp.is_some_and(|last| t >= last) {
                    // In the right stride: skip it and its pair.
                    skip = true;
                } else if skip || (!previous.is_empty() && (t as f64) < first_timestamp) {
                    skip = false;
                } else if chunk.start.is_none() {
                    chunk.start = Some(time);
                } else if Some(time) != chunk.start {
                    chunk.end = Some(time);
                    previous.push(std::mem::take(&mut current));
                    chunk.text = (self.decode)(&longest_common_sequence(&previous))?;
                    chunks.push(std::mem::take(&mut chunk));
                    previous.clear();
                }
            }
            if let Some((chunk_len, _, right)) = window.stride {
                time_offset += chunk_len - right;
            }
            if !current.is_empty() {
                previous.push(current);
            } else if !previous.iter().any(|p| !p.is_empty()) {
                chunk = Chunk::default();
                previous.clear();
            }
        }
        if !previous.is_empty() {
            // No ending timestamp (or no timestamps at all).
            chunk.text = (self.decode)(&longest_common_sequence(&previous))?;
            chunks.push(chunk);
        }
        let text = chunks.iter().map(|c| c.text.as_str()).collect();
        Ok((
            text,
            chunks
                .into_iter()
                .map(|c| (c.text, c.start, c.end))
                .collect(),
        ))
    }
}

/// `_find_longest_common_sequence`: neighbouring windows' tokens joined where they overlap
/// best (the alignment with the highest share of equal tokens, more than one, favouring long
/// ones), the left window trusted for the first half of the overlap and the right one for the
/// second.
pub fn longest_common_sequence(sequences: &[Vec<i64>]) -> Vec<i64> {
    let Some((first, rest)) = sequences.split_first() else {
        return Vec::new();
    };
    let mut left: &[i64] = first;
    let mut total = Vec::new();
    for right in rest {
        let (l, r) = (left.len() as i64, right.len() as i64);
        let mut best = 0.0f64;
        let mut at = (l, l, 0i64, 0i64);
        for i in 1..l + r {
            let eps = i as f64 / 10000.0;
            let left_start = (l - i).max(0);
            let left_stop = l.min(l + r - i);
            let right_start = (i - l).max(0);
            let right_stop = r.min(i);
            let matches = left[left_start as usize..left_stop as usize]
                .iter()
                .zip(&right[right_start as usize..right_stop as usize])
                .filter(|(a, b)| a == b)
                .count();
            let matching = matches as f64 / i as f64 + eps;
            if matches > 1 && matching > best {
                best = matching;
                at = (left_start, left_stop, right_start, right_stop);
            }
        }
        let (left_start, left_stop, right_start, right_stop) = at;
        let left_mid = ((left_stop + left_start) / 2) as usize;
        let right_mid = ((right_stop + right_start) / 2) as usize;
        total.extend_from_slice(&left[..left_mid]);
        left = &right[right_mid..];
    }
    total.extend_from_slice(left);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' test_find_longest_common_subsequence cases.
    #[test]
    fn overlapping_windows_merge_where_they_agree() {
        assert_eq!(longest_common_sequence(&[vec![1, 2, 3]]), [1, 2, 3]);
        assert_eq!(
            longest_common_sequence(&[vec![1, 2, 3, 4], vec![2, 3, 4, 5]]),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            longest_common_sequence(&[vec![1, 2, 3, 4], vec![2, 3, 4, 5], vec![3, 4, 5, 6]]),
            [1, 2, 3, 4, 5, 6]
        );
        // One token in common is not an overlap.
        assert_eq!(
            longest_common_sequence(&[vec![1, 2, 3, 4], vec![4, 5, 6]]),
            [1, 2, 3, 4, 4, 5, 6]
        );
        // Disagreement inside the overlap: left's first half, right's second.
        assert_eq!(
            longest_common_sequence(&[vec![1, 2, 3, 4, 99], vec![2, 98, 4, 5, 6]]),
            [1, 2, 3, 4, 5, 6]
        );
    }

    /// Timestamp pairs split segments; a long-form sequence's second segment restarts its
    /// timestamps and is offset by where the first ended.
    #[test]
    fn timestamps_become_segments() {
        let special: HashSet<i64> = [100].into();
        let languages = HashSet::new();
        let decode = |ids: &[i64]| Ok(ids.iter().map(|i| format!("<{i}>")).collect());
        let text = AsrText {
            timestamp_begin: 200,
            time_precision: 0.02,
            segment_size: 1500.0,
            special: &special,
            languages: &languages,
            timestamps: true,
            decode: &decode,
        };
        // <|0.00|> 1 2 <|1.00|><|1.00|> 3 <|2.00|><|2.00|>, then the next segment from 2 s:
        // <|0.00|> 4 <|0.50|>.
        let tokens = vec![200, 1, 2, 250, 250, 3, 300, 300, 200, 4, 225];
        let (all, segments) = text
            .decode(&[WindowTokens {
                tokens,
                stride: None,
            }])
            .unwrap();
        assert_eq!(all, "<1><2><3><4>");
        assert_eq!(
            segments,
            vec![
                ("<1><2>".to_string(), Some(0.0), Some(1.0)),
                ("<3>".to_string(), Some(1.0), Some(2.0)),
                ("<4>".to_string(), Some(2.0), Some(2.5)),
            ]
        );
        // No timestamps: one segment with neither end known.
        let (all, segments) = text
            .decode(&[WindowTokens {
                tokens: vec![5, 6, 100],
                stride: None,
            }])
            .unwrap();
        assert_eq!(all, "<5><6>");
        assert_eq!(segments, vec![("<5><6>".to_string(), None, None)]);
    }
}
