//! `detect_speech`: voice activity detection with Silero VAD, as the silero-vad package's
//! `get_speech_timestamps` does it.
//!
//! The model is stateful: it reads a recording at 16 kHz in windows of 512 samples (each with
//! the previous window's last 64 samples as context) and carries an LSTM state from window to
//! window; every window gives a speech probability. Recordings of one call run side by side
//! (batch rows, each with its own state). The probabilities become segments with the package's
//! rules and defaults: speech starts at `threshold`, ends after `min_silence_duration_ms` below
//! `neg_threshold` (threshold - 0.15), segments shorter than `min_speech_duration_ms` are
//! dropped, long ones are cut at `max_speech_duration_s`, and each is padded by `speech_pad_ms`.
//!
//! Output: `List<Struct<start: Float64, end: Float64>>`, seconds from the start.

use datafusion::arrow::array::{ArrayRef, Float64Builder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use ort::value::TensorElementType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::audio::{AudioInput, AudioOptions, AudioReading};
use super::core::{ArgColumn, MODEL, RowErrors, Task, struct_column};
use crate::runtime::pool::{SessionInfo, Worker};
use crate::runtime::tensor::{Data, Input, read_named};

/// Options of a `detect_speech` operator (defaults: the silero-vad package's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectSpeechOptions {
    /// A window is speech at or above this probability (default 0.5).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Within speech, a window is silence below this probability (default threshold - 0.15,
    /// at least 0.01).
    #[serde(default)]
    pub neg_threshold: Option<f64>,
    /// Segments this short or shorter are dropped (default 250 ms).
    #[serde(default)]
    pub min_speech_duration_ms: Option<f64>,
    /// Segments are cut before they grow longer than this (default: no limit).
    #[serde(default)]
    pub max_speech_duration_s: Option<f64>,
    /// Silence must last this long to end a segment (default 100 ms).
    #[serde(default)]
    pub min_silence_duration_ms: Option<f64>,
    /// Each segment grows by this much on both sides (default 30 ms).
    #[serde(default)]
    pub speech_pad_ms: Option<f64>,
    /// A silence this long is a place to cut a segment that reaches `max_speech_duration_s`
    /// (default 98 ms).
    #[serde(default)]
    pub min_silence_at_max_speech: Option<f64>,
    /// Cut an over-long segment at its longest silence rather than its last (default true).
    #[serde(default)]
    pub use_max_poss_sil_at_max_speech: Option<bool>,
    /// How recordings are read (they are resampled to 16 kHz).
    #[serde(default)]
    pub audio: AudioOptions,
}

/// The segmentation rules, resolved.
#[derive(Debug, Clone)]
pub struct SpeechRules {
    pub threshold: f64,
    pub neg_threshold: f64,
    pub min_speech_duration_ms: f64,
    pub max_speech_duration_s: f64,
    pub min_silence_duration_ms: f64,
    pub speech_pad_ms: f64,
    pub min_silence_at_max_speech: f64,
    pub use_max_poss_sil_at_max_speech: bool,
}

impl SpeechRules {
    pub fn of(o: &DetectSpeechOptions) -> Result<Self, String> {
        let threshold = o.threshold.unwrap_or(0.5);
        let rules = SpeechRules {
            threshold,
            neg_threshold: o.neg_threshold.unwrap_or((threshold - 0.15).max(0.01)),
            min_speech_duration_ms: o.min_speech_duration_ms.unwrap_or(250.0),
            max_speech_duration_s: o.max_speech_duration_s.unwrap_or(f64::INFINITY),
            min_silence_duration_ms: o.min_silence_duration_ms.unwrap_or(100.0),
            speech_pad_ms: o.speech_pad_ms.unwrap_or(30.0),
            min_silence_at_max_speech: o.min_silence_at_max_speech.unwrap_or(98.0),
            use_max_poss_sil_at_max_speech: o.use_max_poss_sil_at_max_speech.unwrap_or(true),
        };
        for (name, v) in [
            ("threshold", rules.threshold),
            ("neg_threshold", rules.neg_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} is a probability (0 to 1), got {v}"));
            }
        }
        for (name, v) in [
            ("min_speech_duration_ms", rules.min_speech_duration_ms),
            ("max_speech_duration_s", rules.max_speech_duration_s),
            ("min_silence_duration_ms", rules.min_silence_duration_ms),
            ("speech_pad_ms", rules.speech_pad_ms),
            ("min_silence_at_max_speech", rules.min_silence_at_max_speech),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(format!("{name} must not be negative, got {v}"));
            }
        }
        Ok(rules)
    }

    /// Speech segments `[start, end)` in samples from per-window probabilities
    /// (`get_speech_timestamps_from_probs`, sample coordinates).
    pub fn segments(&self, probs: &[f32], samples: usize) -> Vec<(i64, i64)> {
        let sr = RATE as f64;
        let window = WINDOW as i64;
        let audio_len = samples as i64;
        let min_speech = sr * self.min_speech_duration_ms / 1000.0;
        let pad = sr * self.speech_pad_ms / 1000.0;
        let max_speech = sr * self.max_speech_duration_s - window as f64 - 2.0 * pad;
        let min_silence = sr * self.min_silence_duration_ms / 1000.0;
        let min_silence_at_max = sr * self.min_silence_at_max_speech / 1000.0;

        let mut triggered = false;
        let mut speeches: Vec<(i64, i64)> = Vec::new();
        // The segment being built: its start, and its end once known.
        let mut current: Option<i64> = None;
        let (mut temp_end, mut prev_end, mut next_start) = (0i64, 0i64, 0i64);
        let mut possible_ends: Vec<(i64, i64)> = Vec::new();
        for (i, &p) in probs.iter().enumerate() {
            let p = p as f64;
            let cur = window * i as i64;
            if p >= self.threshold && temp_end != 0 {
                let silence = cur - temp_end;
                if silence as f64 > min_silence_at_max {
                    possible_ends.push((temp_end, silence));
                }
                temp_end = 0;
                if next_start < prev_end {
                    next_start = cur;
                }
            }
            if p >= self.threshold && !triggered {
                triggered = true;
                current = Some(cur);
                continue;
            }
            if triggered
                && let Some(start) = current
                && (cur - start) as f64 > max_speech
            {
                if self.use_max_poss_sil_at_max_speech && !possible_ends.is_empty() {
                    // The longest silence (the first of equals, as Python's max).
                    let (end, dur) = possible_ends
                        .iter()
                        .copied()
                        .fold(None, |best: Option<(i64, i64)>, e| match best {
                            Some(b) if b.1 >= e.1 => Some(b),
                            _ => Some(e),
                        })
                        .expect("possible ends");
                    speeches.push((start, end));
                    current = None;
                    next_start = end + dur;
                    if next_start < end + cur {
                        current = Some(next_start);
                    } else {
                        triggered = false;
                    }
                    (prev_end, next_start, temp_end) = (0, 0, 0);
                    possible_ends.clear();
                } else if prev_end != 0 {
                    speeches.push((start, prev_end));
                    current = None;
                    if next_start < prev_end {
                        triggered = false;
                    } else {
                        current = Some(next_start);
                    }
                    (prev_end, next_start, temp_end) = (0, 0, 0);
                    possible_ends.clear();
                } else {
                    speeches.push((start, cur));
                    current = None;
                    (prev_end, next_start, temp_end) = (0, 0, 0);
                    triggered = false;
                    possible_ends.clear();
                    continue;
                }
            }
            if p < self.neg_threshold && triggered {
                if temp_end == 0 {
                    temp_end = cur;
                }
                let silence_now = cur - temp_end;
                if !self.use_max_poss_sil_at_max_speech && silence_now as f64 > min_silence_at_max {
                    prev_end = temp_end;
                }
                if (silence_now as f64) < min_silence {
                    continue;
                }
                if let Some(start) = current
                    && (temp_end - start) as f64 > min_speech
                {
                    speeches.push((start, temp_end));
                }
                current = None;
                (prev_end, next_start, temp_end) = (0, 0, 0);
                triggered = false;
                possible_ends.clear();
                continue;
            }
        }
        if let Some(start) = current
            && (audio_len - start) as f64 > min_speech
        {
            speeches.push((start, audio_len));
        }
        // Padding: neighbours closer than two pads split the silence between them.
        let n = speeches.len();
        for i in 0..n {
            if i == 0 {
                speeches[0].0 = (speeches[0].0 as f64 - pad).max(0.0) as i64;
            }
            if i != n - 1 {
                let silence = speeches[i + 1].0 - speeches[i].1;
                if (silence as f64) < 2.0 * pad {
                    speeches[i].1 += silence.div_euclid(2);
                    speeches[i + 1].0 = (speeches[i + 1].0 - silence.div_euclid(2)).max(0);
                } else {
                    speeches[i].1 = (speeches[i].1 as f64 + pad).min(audio_len as f64) as i64;
                    speeches[i + 1].0 = (speeches[i + 1].0 as f64 - pad).max(0.0) as i64;
                }
            } else {
                speeches[i].1 = (speeches[i].1 as f64 + pad).min(audio_len as f64) as i64;
            }
        }
        speeches
    }
}

/// Silero VAD's rate, window and context (16 kHz).
const RATE: u32 = 16000;
const WINDOW: usize = 512;
const CONTEXT: usize = 64;
/// The LSTM state per batch row: [2, batch, 128].
const STATE: usize = 128;

/// The task resolved against its model.
#[derive(Debug)]
pub struct DetectSpeech {
    reading: AudioReading,
    rules: SpeechRules,
}

impl DetectSpeech {
    pub fn resolve(options: &DetectSpeechOptions, session: &SessionInfo) -> Result<Self, OpError> {
        let names: Vec<&str> = session.inputs.iter().map(|i| i.name.as_str()).collect();
        let outputs: Vec<&str> = session.outputs.iter().map(|o| o.name.as_str()).collect();
        let float_input = session
            .inputs
            .iter()
            .any(|i| i.name == "input" && matches!(i.element, Some(TensorElementType::Float32)));
        if !float_input
            || !names.contains(&"state")
            || !names.contains(&"sr")
            || !outputs.contains(&"output")
            || !outputs.contains(&"stateN")
        {
            return Err(OpError::Model(format!(
                "{}: detect_speech runs Silero VAD (inputs input, state, sr; outputs output, stateN); \
                 this model has inputs {} and outputs {}",
                session.path.display(),
                names.join(", "),
                outputs.join(", ")
            )));
        }
        Ok(DetectSpeech {
            reading: AudioReading::new(&options.audio, RATE).map_err(OpError::Options)?,
            rules: SpeechRules::of(options).map_err(OpError::Options)?,
        })
    }

    /// Speech probabilities of each window of each recording, the recordings side by side.
    fn probabilities(
        &self,
        worker: &mut Worker,
        items: &[&Vec<f32>],
    ) -> Result<Vec<Vec<f32>>, String> {
        let b = items.len();
        let windows: Vec<usize> = items.iter().map(|x| x.len().div_ceil(WINDOW)).collect();
        let steps = windows.iter().copied().max().unwrap_or(0);
        let mut state = vec![0f32; 2 * b * STATE];
        let mut context = vec![0f32; b * CONTEXT];
        let mut probs: Vec<Vec<f32>> = windows.iter().map(|&n| Vec::with_capacity(n)).collect();
        let names = ["output".to_string(), "stateN".to_string()];
        for w in 0..steps {
            let mut input = Vec::with_capacity(b * (CONTEXT + WINDOW));
            for (row, x) in items.iter().enumerate() {
                input.extend_from_slice(&context[row * CONTEXT..(row + 1) * CONTEXT]);
                let from = (w * WINDOW).min(x.len());
                let to = ((w + 1) * WINDOW).min(x.len());
                input.extend_from_slice(&x[from..to]);
                input.extend(std::iter::repeat_n(0.0, WINDOW - (to - from)));
                let end = input.len();
                context[row * CONTEXT..(row + 1) * CONTEXT]
                    .copy_from_slice(&input[end - CONTEXT..end]);
            }
            let outputs = worker.run(
                MODEL,
                vec![
                    Input::new(
                        "input",
                        vec![b as i64, (CONTEXT + WINDOW) as i64],
                        Data::F32(input),
                    ),
                    Input::new("state", vec![2, b as i64, STATE as i64], Data::F32(state)),
                    Input::new("sr", vec![], Data::I64(vec![RATE as i64])),
                ],
            )?;
            let views = read_named(&outputs, &names)?;
            views[0].expect_shape(&[b, 1])?;
            views[1].expect_shape(&[2, b, STATE])?;
            for (row, p) in probs.iter_mut().enumerate() {
                if w < windows[row] {
                    p.push(views[0].data[row]);
                }
            }
            state = views[1].data.to_vec();
        }
        Ok(probs)
    }
}

impl Task for DetectSpeech {
    type Input = AudioInput;
    /// A recording at 16 kHz.
    type Item = Vec<f32>;
    /// Its segments in samples, and its length.
    type Out = (Vec<(i64, i64)>, usize);
    type Row = Vec<(f64, f64)>;

    fn output_type(&self) -> DataType {
        DataType::new_list(DataType::Struct(segment_fields()), true)
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<AudioInput>>> {
        self.reading.read(&args[0], errors)
    }

    fn prepare(&self, input: &AudioInput) -> Result<Vec<Vec<f32>>, String> {
        Ok(vec![self.reading.load(input)?])
    }

    fn cost(&self, item: &Vec<f32>) -> usize {
        item.len()
    }

    fn feed(&self, items: &[&Vec<f32>]) -> Result<Vec<Input>, String> {
        // The first window of each recording (what one step runs).
        let b = items.len();
        let mut input = vec![0f32; b * (CONTEXT + WINDOW)];
        for (row, x) in items.iter().enumerate() {
            let n = x.len().min(WINDOW);
            let at = row * (CONTEXT + WINDOW) + CONTEXT;
            input[at..at + n].copy_from_slice(&x[..n]);
        }
        Ok(vec![
            Input::new(
                "input",
                vec![b as i64, (CONTEXT + WINDOW) as i64],
                Data::F32(input),
            ),
            Input::new(
                "state",
                vec![2, b as i64, STATE as i64],
                Data::F32(vec![0.0; 2 * b * STATE]),
            ),
            Input::new("sr", vec![], Data::I64(vec![RATE as i64])),
        ])
    }

    fn run(&self, worker: &mut Worker, items: &[&Vec<f32>]) -> Result<Vec<Self::Out>, String> {
        let probs = self.probabilities(worker, items)?;
        Ok(probs
            .iter()
            .zip(items)
            .map(|(p, x)| (self.rules.segments(p, x.len()), x.len()))
            .collect())
    }

    fn finish(&self, _input: &AudioInput, mut outs: Vec<Self::Out>) -> Result<Self::Row, String> {
        let (segments, _) = outs.pop().ok_or("no result for the recording")?;
        Ok(segments
            .into_iter()
            .map(|(s, e)| (s as f64 / RATE as f64, e as f64 / RATE as f64))
            .collect())
    }

    fn to_array(&self, rows: Vec<Option<Self::Row>>) -> Result<ArrayRef> {
        struct_column(segment_fields(), &rows, false, |item, &(start, end)| {
            item.field_builder::<Float64Builder>(0)
                .expect("start")
                .append_value(start);
            item.field_builder::<Float64Builder>(1)
                .expect("end")
                .append_value(end);
        })
    }

    fn wave_rows(&self) -> usize {
        128
    }
}

fn segment_fields() -> Fields {
    Fields::from(vec![
        Field::new("start", DataType::Float64, false),
        Field::new("end", DataType::Float64, false),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SpeechRules {
        SpeechRules::of(&DetectSpeechOptions::default()).unwrap()
    }

    #[test]
    fn segments_follow_the_package_rules() {
        let r = rules();
        // 1 s of speech (31 windows) between silences: padded by 480 samples on each side.
        let mut probs = vec![0.0f32; 10];
        probs.extend(vec![0.9; 31]);
        probs.extend(vec![0.0; 20]);
        let samples = probs.len() * WINDOW;
        assert_eq!(
            r.segments(&probs, samples),
            vec![(10 * 512 - 480, 41 * 512 + 480)]
        );
        // Speech shorter than 250 ms is dropped; a short dip does not end a segment.
        let mut probs = vec![0.0f32; 4];
        probs.extend(vec![0.9; 5]);
        probs.extend(vec![0.0; 10]);
        assert!(r.segments(&probs, probs.len() * WINDOW).is_empty());
        let mut probs = vec![0.9f32; 20];
        probs.extend(vec![0.2; 2]);
        probs.extend(vec![0.9; 20]);
        assert_eq!(r.segments(&probs, probs.len() * WINDOW).len(), 1);
    }
}
