//! Audio models that take raw samples (`input_values`, wav2vec2-style) as core tasks: the
//! recording read and brought to the model's rate, cut into windows where the task asks,
//! normalized, batched, and the outputs handed to the task frame by frame.

use std::path::Path;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use ort::value::TensorElementType;
use serde::Deserialize;

use super::features::Wav2Vec2Features;
use super::{AudioInput, AudioOptions, AudioReading};
use crate::ops::OpError;
use crate::ops::core::{ArgColumn, MODEL, RowErrors, Task};
use crate::ops::generation::task::OneOrMany;
use crate::runtime::model_dir::read_json;
use crate::runtime::pool::{SessionInfo, TensorInfo, Worker};
use crate::runtime::tensor::{Data, Input, Output, read_named};

/// The convolutional feature encoder's geometry (config.json), which decides how many output
/// frames a number of samples gives.
#[derive(Debug, Clone, Deserialize)]
struct ConvConfig {
    #[serde(default = "default_kernels")]
    conv_kernel: Vec<usize>,
    #[serde(default = "default_strides")]
    conv_stride: Vec<usize>,
}

fn default_kernels() -> Vec<usize> {
    vec![10, 3, 3, 3, 3, 2, 2]
}

fn default_strides() -> Vec<usize> {
    vec![5, 2, 2, 2, 2, 2, 2]
}

/// A raw-samples audio model: its input, extractor, and how recordings are read.
#[derive(Debug)]
pub struct AudioModel {
    pub reading: AudioReading,
    pub features: Wav2Vec2Features,
    input: String,
    /// `attention_mask`, when the model takes one: then recordings of different lengths share
    /// calls, padded; otherwise only recordings of one length do (padding would change what
    /// the model sees).
    mask: Option<String>,
    /// (kernel, stride) of each convolution.
    convs: Vec<(usize, usize)>,
    pub outputs: Vec<TensorInfo>,
}

impl AudioModel {
    pub fn open(
        task: &'static str,
        dir: &Path,
        session: &SessionInfo,
        options: &AudioOptions,
    ) -> Result<Self, OpError> {
        let mut input = None;
        let mut mask = None;
        for i in &session.inputs {
            let float = matches!(
                i.element,
                Some(TensorElementType::Float32 | TensorElementType::Float16)
            );
            match i.name.as_str() {
                "attention_mask" => mask = Some(i.name.clone()),
                _ if float && i.shape.len() == 2 && input.is_none() => input = Some(i.name.clone()),
                other => {
                    return Err(OpError::Model(format!(
                        "{}: the model expects an input '{other}' ({:?}, shape {:?}) that the {task} task cannot provide \
                         (a speech model takes input_values [batch, samples] and optionally attention_mask); \
                         is this the right model for the task?",
                        session.path.display(),
                        i.element,
                        i.shape
                    )));
                }
            }
        }
        let input = input.ok_or_else(|| {
            OpError::Model(format!(
                "{}: the model has no raw-audio input (a 2-d float tensor input_values; it has {}); \
                 the {task} task needs a wav2vec2-style model",
                session.path.display(),
                session.input_names()
            ))
        })?;
        let features = Wav2Vec2Features::load(dir).map_err(OpError::Model)?;
        let conv: ConvConfig = read_json(&dir.join("config.json"))?.unwrap_or(ConvConfig {
            conv_kernel: default_kernels(),
            conv_stride: default_strides(),
        });
        if conv.conv_kernel.len() != conv.conv_stride.len()
            || conv.conv_stride.contains(&0)
            || conv.conv_kernel.contains(&0)
        {
            return Err(OpError::Model(format!(
                "{}: conv_kernel {:?} and conv_stride {:?} do not describe a feature encoder",
                dir.join("config.json").display(),
                conv.conv_kernel,
                conv.conv_stride
            )));
        }
        let reading =
            AudioReading::new(options, features.sampling_rate).map_err(OpError::Options)?;
        Ok(AudioModel {
            reading,
            features,
            input,
            mask,
            convs: conv.conv_kernel.into_iter().zip(conv.conv_stride).collect(),
            outputs: session.outputs.clone(),
        })
    }

    /// Samples per output frame (`inputs_to_logits_ratio`: the product of the strides).
    pub fn samples_per_frame(&self) -> usize {
        self.convs.iter().map(|(_, s)| s).product()
    }

    /// Output frames of `samples` samples (`_get_feat_extract_output_lengths`); None when the
    /// recording is too short for the convolutions.
    pub fn frames(&self, samples: usize) -> Option<usize> {
        let mut n = samples;
        for &(k, s) in &self.convs {
            if n < k {
                return None;
            }
            n = (n - k) / s + 1;
        }
        Some(n)
    }

    /// The fewest samples that give one frame.
    fn min_samples(&self) -> usize {
        self.convs
            .iter()
            .rev()
            .fold(1, |need, &(k, s)| (need - 1) * s + k)
    }
}

/// How a recording is cut into windows (samples): the ASR pipeline's `chunk_length_s` and
/// `stride_length_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub chunk: usize,
    pub left: usize,
    pub right: usize,
}

/// One window of a recording: samples `[start, end)`, of which the first `left` and last
/// `right` are the overlap with its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub left: usize,
    pub right: usize,
}

impl Chunking {
    /// The options in samples at `rate`, sizes multiples of `align` samples rounded as the
    /// pipeline rounds them; None when `chunk_length_s` is unset or 0.
    pub fn from_options(
        chunk_length_s: Option<f64>,
        stride_length_s: Option<&OneOrMany<f64>>,
        rate: u32,
        align: usize,
    ) -> Result<Option<Chunking>, OpError> {
        let c = match chunk_length_s {
            Some(c) if c < 0.0 || !c.is_finite() => {
                return Err(OpError::Options(format!(
                    "chunk_length_s must be a positive number of seconds, got {c}"
                )));
            }
            Some(c) if c > 0.0 => c,
            _ => return Ok(None),
        };
        let (left, right) = match stride_length_s {
            None => (c / 6.0, c / 6.0),
            Some(OneOrMany::One(s)) => (*s, *s),
            Some(OneOrMany::Many(v)) if v.len() == 2 => (v[0], v[1]),
            Some(OneOrMany::Many(v)) => {
                return Err(OpError::Options(format!(
                    "stride_length_s is one number or [left, right], got {} numbers",
                    v.len()
                )));
            }
        };
        let samples = |s: f64| (py_round(s * rate as f64 / align as f64) * align as f64) as i64;
        let (chunk, left, right) = (samples(c), samples(left), samples(right));
        if left < 0 || right < 0 || chunk <= left + right {
            return Err(OpError::Options(format!(
                "chunk_length_s ({c} s = {chunk} samples) must be longer than the strides ({left} + {right} samples)"
            )));
        }
        Ok(Some(Chunking {
            chunk: chunk as usize,
            left: left as usize,
            right: right as usize,
        }))
    }

    /// The windows of `len` samples, as `chunk_iter` cuts them: `chunk` samples every
    /// `chunk - left - right`; the first has no left stride and the last no right one; a
    /// window no longer than its left stride is skipped.
    pub fn windows(&self, len: usize) -> Vec<Window> {
        let step = self.chunk - self.left - self.right;
        let mut windows = Vec::new();
        let mut start = 0;
        while start < len {
            let end = (start + self.chunk).min(len);
            let last = start + self.chunk >= len;
            let left = if start == 0 { 0 } else { self.left };
            let right = if last { 0 } else { self.right };
            if end - start > left {
                windows.push(Window {
                    start,
                    end,
                    left,
                    right,
                });
            }
            if last {
                break;
            }
            start += step;
        }
        windows
    }
}

/// One window of a recording, ready to run.
#[derive(Debug)]
pub struct Clip {
    /// `input_values`.
    pub values: Vec<f32>,
    /// Output frames of these samples.
    pub frames: usize,
    /// The frames that count, `[start, end)`: a chunk's strides cut off (all of them otherwise).
    pub keep: (usize, usize),
}

/// What an audio task kind supplies.
pub trait AudioTask: Send + Sync + 'static {
    /// What the worker keeps of one window's outputs.
    type Raw: Send + 'static;
    /// What one recording's windows become.
    type Out: Send + 'static;
    fn output_type(&self) -> DataType;
    /// The model outputs (f32, by name) that [`AudioTask::postprocess`] reads, in order.
    fn outputs(&self) -> &[String];
    /// Windows to cut recordings into (None: each recording runs whole).
    fn chunking(&self) -> Option<Chunking> {
        None
    }
    /// One call's outputs, one result per clip.
    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        clips: &[&Clip],
    ) -> Result<Vec<Self::Raw>, String>;
    /// One recording's window results, in order.
    fn finish(&self, raws: Vec<Self::Raw>) -> Result<Self::Out, String>;
    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef>;
}

/// An audio task as a core task: rows are recordings, items are windows, cost is samples.
pub struct AudioOp<T: AudioTask> {
    pub model: AudioModel,
    pub task: T,
}

impl<T: AudioTask> AudioOp<T> {
    fn clip(
        &self,
        samples: &[f32],
        keep: impl FnOnce(usize) -> (usize, usize),
    ) -> Result<Clip, String> {
        let frames = self.model.frames(samples.len()).ok_or_else(|| {
            format!(
                "the recording is too short: {} samples at {} Hz, the model needs at least {}",
                samples.len(),
                self.model.features.sampling_rate,
                self.model.min_samples()
            )
        })?;
        Ok(Clip {
            values: self.model.features.apply(samples),
            frames,
            keep: keep(frames),
        })
    }
}

/// Python's `round` (half to even), as the pipeline rounds sizes.
pub fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

impl<T: AudioTask> Task for AudioOp<T> {
    type Input = AudioInput;
    type Item = Clip;
    type Out = T::Raw;
    type Row = T::Out;

    fn output_type(&self) -> DataType {
        self.task.output_type()
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<AudioInput>>> {
        self.model.reading.read(&args[0], errors)
    }

    fn prepare(&self, input: &AudioInput) -> Result<Vec<Clip>, String> {
        let samples = self.model.reading.load(input)?;
        let Some(c) = self.task.chunking() else {
            return Ok(vec![self.clip(&samples, |frames| (0, frames))?]);
        };
        // Strides become frames as rescale_stride rounds them.
        let ratio = 1.0 / self.model.samples_per_frame() as f64;
        let mut clips = Vec::new();
        for w in c.windows(samples.len()) {
            let n = w.end - w.start;
            let token_n = py_round(n as f64 * ratio) as usize;
            let l = py_round(w.left as f64 / n as f64 * token_n as f64) as usize;
            let r = py_round(w.right as f64 / n as f64 * token_n as f64) as usize;
            clips.push(self.clip(&samples[w.start..w.end], |frames| {
                let stop = token_n.saturating_sub(r).min(frames);
                (l.min(stop), stop)
            })?);
        }
        Ok(clips)
    }

    fn cost(&self, item: &Clip) -> usize {
        item.values.len()
    }

    fn batch_key(&self, item: &Clip) -> u64 {
        match self.model.mask {
            Some(_) => 0,
            None => item.values.len() as u64,
        }
    }

    fn feed(&self, items: &[&Clip]) -> Result<Vec<Input>, String> {
        let longest = items.iter().map(|c| c.values.len()).max().unwrap_or(0);
        let mut values = Vec::with_capacity(items.len() * longest);
        let mut mask = Vec::with_capacity(items.len() * longest);
        for c in items {
            values.extend_from_slice(&c.values);
            values.extend(std::iter::repeat_n(
                self.model.features.padding_value,
                longest - c.values.len(),
            ));
            mask.extend(std::iter::repeat_n(1i64, c.values.len()));
            mask.extend(std::iter::repeat_n(0i64, longest - c.values.len()));
        }
        let shape = vec![items.len() as i64, longest as i64];
        let mut inputs = vec![Input::new(
            self.model.input.clone(),
            shape.clone(),
            Data::F32(values),
        )];
        if let Some(name) = &self.model.mask {
            inputs.push(Input::new(name.clone(), shape, Data::I64(mask)));
        }
        Ok(inputs)
    }

    fn run(&self, worker: &mut Worker, items: &[&Clip]) -> Result<Vec<T::Raw>, String> {
        let outputs = worker.run_selected(MODEL, self.feed(items)?, self.task.outputs())?;
        let views = read_named(&outputs, self.task.outputs())?;
        self.task.postprocess(&views, items)
    }

    fn finish(&self, _input: &AudioInput, outs: Vec<T::Raw>) -> Result<T::Out, String> {
        self.task.finish(outs)
    }

    fn to_array(&self, rows: Vec<Option<T::Out>>) -> Result<ArrayRef> {
        self.task.to_array(rows)
    }

    fn wave_rows(&self) -> usize {
        // Decoded recordings of a wave are held together: about 30 s each at 16 kHz (2 MB).
        128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_the_convolutions() {
        let convs: Vec<(usize, usize)> = default_kernels()
            .into_iter()
            .zip(default_strides())
            .collect();
        let frames = |samples: usize| {
            let mut n = samples;
            for &(k, s) in &convs {
                if n < k {
                    return None;
                }
                n = (n - k) / s + 1;
            }
            Some(n)
        };
        // wav2vec2-base: 1 s at 16 kHz gives 49 frames; 400 samples are the least for one.
        assert_eq!(frames(16000), Some(49));
        assert_eq!(frames(400), Some(1));
        assert_eq!(frames(399), None);
        let min = convs
            .iter()
            .rev()
            .fold(1, |need, &(k, s)| (need - 1) * s + k);
        assert_eq!(min, 400);
    }
}
