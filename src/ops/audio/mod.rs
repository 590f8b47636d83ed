//! Audio input for every audio task: reading audio arguments (encoded bytes, paths, raw
//! samples), decoding, downmixing, resampling, and the feature extractors.
//!
//! The `transformers` pipelines decode bytes and paths with ffmpeg into mono f32 at the
//! feature extractor's rate. ferry decodes with `symphonia` (WAV 8/16/24/32-bit integer and
//! float, FLAC, MP3, Ogg Vorbis, ADPCM), converts samples as ffmpeg does (i16 / 32768,
//! u8 / 128 - 1, ...), mixes stereo to mono as ffmpeg does ((L + R) x sqrt(1/2); more channels:
//! their mean) and resamples with `rubato`'s FFT resampler. PCM at the model's rate gives the
//! pipeline's samples exactly; resampled audio differs from ffmpeg's resampler slightly
//! (README: Audio).

pub mod decode_asr;
pub mod features;
pub mod model;
pub mod whisper;

use std::io::Cursor;
use std::path::PathBuf;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::{DataType, Float32Type};
use datafusion::common::{Result, exec_err};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

use super::core::{ArgColumn, RowErrors};
use super::image::ImageReading;

/// How an audio operator reads its recordings (the `audio` task option).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioOptions {
    /// The sampling rate of raw sample lists (`List<Float32>` / `List<Float64>`) that do not
    /// carry their own (default: the model's rate, as the pipeline assumes for an array).
    #[serde(default)]
    pub sampling_rate: Option<u32>,
    /// Refuse recordings longer than this many seconds, before decoding them where the file
    /// says its length (default 3600).
    #[serde(default)]
    pub max_duration_s: Option<f64>,
    /// Directories that path arguments may name (default: the working directory).
    #[serde(default)]
    pub allow_roots: Vec<PathBuf>,
}

/// Recordings longer than this are refused unless `max_duration_s` says otherwise.
pub const DEFAULT_MAX_DURATION_S: f64 = 3600.0;

/// One row's recording: encoded bytes (kept in their column), a path, or samples.
#[derive(Debug, Clone)]
pub enum AudioInput {
    Bytes { array: ArrayRef, row: usize },
    Path(String),
    Samples { samples: Vec<f32>, rate: u32 },
}

/// How audio arguments are read and brought to the model's rate.
#[derive(Debug, Clone)]
pub struct AudioReading {
    /// The model's (feature extractor's) sampling rate.
    pub rate: u32,
    /// The rate of raw sample lists without their own.
    pub list_rate: u32,
    pub max_duration_s: f64,
    /// Path checks (allowed roots), shared with images.
    paths: ImageReading,
}

impl AudioReading {
    pub fn new(options: &AudioOptions, rate: u32) -> Result<Self, String> {
        let max_duration_s = options.max_duration_s.unwrap_or(DEFAULT_MAX_DURATION_S);
        if max_duration_s.is_nan() || max_duration_s <= 0.0 {
            return Err(format!(
                "max_duration_s must be positive, got {max_duration_s}"
            ));
        }
        if options.sampling_rate == Some(0) {
            return Err("sampling_rate must be positive".into());
        }
        Ok(AudioReading {
            rate,
            list_rate: options.sampling_rate.unwrap_or(rate),
            max_duration_s,
            paths: ImageReading::new(None, &options.allow_roots)?,
        })
    }

    /// Reads each row's audio argument. Bytes stay in their column; strings are paths; lists
    /// are samples at `sampling_rate`; structs carry `array` (or `raw`) and `sampling_rate`.
    pub fn read(&self, arg: &ArgColumn<'_>, errors: &RowErrors) -> Result<Vec<Option<AudioInput>>> {
        let array = arg.array;
        let n = array.len();
        Ok(match array.data_type() {
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => (0..n)
                .map(|row| {
                    array.is_valid(row).then(|| AudioInput::Bytes {
                        array: array.clone(),
                        row,
                    })
                })
                .collect(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let strings = datafusion::arrow::compute::cast(array, &DataType::Utf8)?;
                strings
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.map(|p| AudioInput::Path(p.to_string())))
                    .collect()
            }
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
                let rates = vec![Some(self.list_rate as i64); n];
                samples_rows(arg.field, array, &rates, errors)?
            }
            DataType::Struct(fields) => {
                let s = array.as_struct();
                let values = ["array", "raw"]
                    .iter()
                    .find_map(|name| s.column_by_name(name));
                let (Some(values), Some(rates)) = (values, s.column_by_name("sampling_rate"))
                else {
                    return exec_err!(
                        "cannot read audio from the struct column '{}' (fields {}): it needs `array` (or `raw`) samples and `sampling_rate`",
                        arg.field,
                        fields
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                };
                let rates = datafusion::arrow::compute::cast(rates, &DataType::Int64)?;
                let rates: Vec<Option<i64>> = rates
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .iter()
                    .collect();
                let mut rows = samples_rows(arg.field, values, &rates, errors)?;
                for (row, r) in rows.iter_mut().enumerate() {
                    if s.is_null(row) {
                        *r = None;
                    }
                }
                rows
            }
            DataType::Null => vec![None; n],
            other => {
                return exec_err!("cannot read audio from a {other} column '{}'", arg.field);
            }
        })
    }

    /// Most samples a recording may have at `rate`.
    fn max_samples(&self, rate: u32) -> u64 {
        (self.max_duration_s * rate as f64).ceil() as u64
    }

    /// One row's recording as mono f32 samples at the model's rate.
    pub fn load(&self, input: &AudioInput) -> Result<Vec<f32>, String> {
        let (samples, rate) = match input {
            AudioInput::Bytes { array, row } => {
                let bytes: &[u8] = match array.data_type() {
                    DataType::Binary => array.as_binary::<i32>().value(*row),
                    DataType::LargeBinary => array.as_binary::<i64>().value(*row),
                    DataType::BinaryView => array.as_binary_view().value(*row),
                    DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(*row),
                    other => return Err(format!("cannot read audio bytes from {other}")),
                };
                self.decode(bytes.to_vec())?
            }
            AudioInput::Path(p) => {
                let path = self.paths.resolve(p)?;
                let bytes = std::fs::read(&path).map_err(|e| format!("{p}: {e}"))?;
                self.decode(bytes).map_err(|e| format!("{p}: {e}"))?
            }
            AudioInput::Samples { samples, rate } => {
                if samples.len() as u64 > self.max_samples(*rate) {
                    return Err(self.too_long(samples.len() as u64, *rate));
                }
                (samples.clone(), *rate)
            }
        };
        if samples.is_empty() {
            return Err("the recording has no samples".into());
        }
        if let Some(i) = samples.iter().position(|s| !s.is_finite()) {
            return Err(format!(
                "sample {i} is {} (at {:.3} s); audio samples must be finite",
                samples[i],
                i as f64 / rate as f64
            ));
        }
        resample(&samples, rate, self.rate)
    }

    fn too_long(&self, samples: u64, rate: u32) -> String {
        format!(
            "the recording is {:.1} s long, over the limit of {} s; raise the operator's `audio.max_duration_s` option to accept it",
            samples as f64 / rate as f64,
            self.max_duration_s
        )
    }

    /// Decodes encoded audio to mono f32 at its own rate.
    pub fn decode(&self, bytes: Vec<u8>) -> Result<(Vec<f32>, u32), String> {
        if bytes.is_empty() {
            return Err("empty audio (zero bytes)".into());
        }
        let stream = MediaSourceStream::new(
            Box::new(Cursor::new(bytes)),
            MediaSourceStreamOptions::default(),
        );
        let mut format = symphonia::default::get_probe()
            .probe(
                &Hint::new(),
                stream,
                FormatOptions::default(),
                MetadataOptions::default(),
            )
            .map_err(|e| {
                format!("not audio ferry can decode (WAV, FLAC, MP3 or Ogg Vorbis): {e}")
            })?;
        let track = format
            .default_track(TrackType::Audio)
            .ok_or("the file has no audio track")?;
        let track_id = track.id;
        let params = track
            .codec_params
            .as_ref()
            .and_then(|p| p.audio())
            .ok_or("the file's audio track has no codec parameters")?
            .clone();
        let rate = params
            .sample_rate
            .filter(|&r| r > 0)
            .ok_or("the file does not say its sampling rate")?;
        let channels = params.channels.as_ref().map_or(1, |c| c.count()).max(1);
        // Refuse what the header says is too long before decoding any of it.
        if let Some(frames) = track.num_frames
            && frames > self.max_samples(rate)
        {
            return Err(self.too_long(frames, rate));
        }
        let mut decoder = symphonia::default::get_codecs()
            .make_audio_decoder(&params, &AudioDecoderOptions::default())
            .map_err(|e| format!("unsupported audio codec: {e}"))?;
        let max = self.max_samples(rate);
        let mut mono: Vec<f32> = Vec::new();
        let mut buf: Vec<f32> = Vec::new();
        loop {
            let packet = match format.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(symphonia::core::errors::Error::IoError(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    // A truncated file: keep what was decoded, as ffmpeg does.
                    break;
                }
                Err(e) => return Err(format!("reading the audio: {e}")),
            };
            if packet.track_id != track_id {
                continue;
            }
            let decoded = match decoder.decode(&packet) {
                Ok(d) => d,
                // A damaged packet is skipped, as ffmpeg skips it.
                Err(symphonia::core::errors::Error::DecodeError(_)) => continue,
                Err(e) => return Err(format!("decoding the audio: {e}")),
            };
            let n = decoded.samples_interleaved();
            buf.resize(n, 0.0);
            decoded.copy_to_slice_interleaved(&mut buf[..]);
            let ch = decoded.spec().channels().count().max(1);
            if ch != channels && !mono.is_empty() {
                return Err(format!(
                    "the channel count changes from {channels} to {ch} mid-stream"
                ));
            }
            if ch == 1 {
                mono.extend_from_slice(&buf);
            } else if ch == 2 {
                // ffmpeg's stereo to mono (what the pipeline reads): (L + R) x sqrt(1/2).
                mono.extend(buf.chunks_exact(2).map(|lr| {
                    lr[0] * std::f32::consts::FRAC_1_SQRT_2
                        + lr[1] * std::f32::consts::FRAC_1_SQRT_2
                }));
            } else {
                mono.extend(
                    buf.chunks_exact(ch)
                        .map(|frame| frame.iter().sum::<f32>() / ch as f32),
                );
            }
            if mono.len() as u64 > max {
                return Err(self.too_long(mono.len() as u64, rate));
            }
        }
        if mono.is_empty() {
            return Err("the file holds no audio samples".into());
        }
        Ok((mono, rate))
    }
}

/// Samples of each row of a list column (nulls and rows with a null rate are None).
fn samples_rows(
    field: &str,
    values: &ArrayRef,
    rates: &[Option<i64>],
    errors: &RowErrors,
) -> Result<Vec<Option<AudioInput>>> {
    // The same check as at plan time (`is_samples_list`), for struct fields too.
    if !is_samples_list(values.data_type()) {
        return exec_err!(
            "cannot read audio samples from the column '{field}' ({}): samples are a list of Float32 or Float64",
            values.data_type()
        );
    }
    let lists = datafusion::arrow::compute::cast(
        values,
        &DataType::LargeList(std::sync::Arc::new(
            datafusion::arrow::datatypes::Field::new_list_field(DataType::Float32, true),
        )),
    )?;
    let lists = lists.as_list::<i64>();
    let mut rows = Vec::with_capacity(lists.len());
    for (row, rate) in rates.iter().enumerate() {
        if lists.is_null(row) {
            rows.push(None);
            continue;
        }
        let rate = match rate {
            Some(r) if *r > 0 && *r <= u32::MAX as i64 => *r as u32,
            Some(r) => {
                errors.push(
                    row,
                    format!("{field}: sampling_rate {r} is not a positive rate"),
                );
                rows.push(None);
                continue;
            }
            None => {
                errors.push(row, format!("{field}: the row has no sampling_rate"));
                rows.push(None);
                continue;
            }
        };
        let value = lists.value(row);
        let floats = value.as_primitive::<Float32Type>();
        if floats.null_count() > 0 {
            errors.push(row, format!("{field}: the samples hold nulls"));
            rows.push(None);
            continue;
        }
        rows.push(Some(AudioInput::Samples {
            samples: floats.values().to_vec(),
            rate,
        }));
    }
    Ok(rows)
}

/// Resamples mono samples with rubato's FFT resampler (a no-op at the same rate).
///
/// The resampler works in blocks of a multiple of `from / gcd(from, to)` input samples; its
/// delay is half a block, trimmed by `process_all` in whole output samples, which leaves half
/// an input sample of shift when the block is odd (22.05 or 44.1 to 16 kHz). An even block
/// keeps output sample n at input time n x from / to, where ffmpeg puts it.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    use rubato::audioadapter_buffers::direct::InterleavedSlice;
    use rubato::{Fft, FixedSync, Resampler};
    if from == to {
        return Ok(samples.to_vec());
    }
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let (from_n, to_n) = (from as usize, to as usize);
    let min_block = from_n / gcd(from_n, to_n);
    // About 1024 input samples a block, an even number of minimal blocks.
    let blocks = 1024usize.div_ceil(min_block).next_multiple_of(2);
    let mut resampler = Fft::<f32>::new(from_n, to_n, blocks * min_block, 1, FixedSync::Both)
        .map_err(|e| format!("resampling from {from} Hz to {to} Hz: {e}"))?;
    let input =
        InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| format!("resampling: {e}"))?;
    let out = resampler
        .process_all(&input, samples.len(), None)
        .map_err(|e| format!("resampling from {from} Hz to {to} Hz: {e}"))?;
    Ok(out.take_data())
}

/// The struct type of the `{array, sampling_rate}` inputs, for plan-time checks.
pub fn is_samples_struct(t: &DataType) -> bool {
    let DataType::Struct(fields) = t else {
        return false;
    };
    let has = |name: &str| fields.iter().any(|f| f.name() == name);
    (has("array") || has("raw")) && has("sampling_rate")
}

/// Whether a column type is a list of float samples.
pub fn is_samples_list(t: &DataType) -> bool {
    matches!(t, DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
        if matches!(f.data_type(), DataType::Float32 | DataType::Float64 | DataType::Float16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> AudioReading {
        AudioReading::new(&AudioOptions::default(), 16000).unwrap()
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let r = reading();
        assert!(r.decode(Vec::new()).unwrap_err().contains("zero bytes"));
        assert!(r.decode(b"hello, I am text".to_vec()).is_err());
        assert!(r.decode(b"RIFF\x10\0\0\0WAVEfmt ".to_vec()).is_err());
    }

    /// A 440 Hz tone keeps its length, amplitude and timing (output sample n at input time
    /// n x from / to, no fractional shift) for downsampling by odd and even blocks and for
    /// upsampling.
    #[test]
    fn resampling_keeps_a_tone_in_time() {
        for (from, to) in [
            (44100u32, 16000u32),
            (22050, 16000),
            (8000, 16000),
            (48000, 16000),
        ] {
            let f = 440.0f64;
            let x: Vec<f32> = (0..from as usize)
                .map(|i| {
                    ((2.0 * std::f64::consts::PI * f * i as f64 / from as f64).sin() * 0.5) as f32
                })
                .collect();
            let y = resample(&x, from, to).unwrap();
            assert_eq!(y.len(), to as usize);
            // The tone's phase and amplitude away from the edges.
            let (mut s, mut c) = (0f64, 0f64);
            let range = 2000..(to as usize - 2000);
            let n = range.len() as f64;
            for i in range {
                let w = 2.0 * std::f64::consts::PI * f * i as f64 / to as f64;
                s += y[i] as f64 * w.sin();
                c += y[i] as f64 * w.cos();
            }
            let shift = -c.atan2(s) / (2.0 * std::f64::consts::PI * f) * to as f64;
            let amplitude = (s * s + c * c).sqrt() * 2.0 / n;
            assert!(
                shift.abs() < 0.01,
                "{from} -> {to}: shifted by {shift} samples"
            );
            assert!(
                (amplitude - 0.5).abs() < 1e-3,
                "{from} -> {to}: amplitude {amplitude}"
            );
        }
    }
}
