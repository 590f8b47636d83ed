//! Feature extractors: what `preprocessor_config.json` says turns samples into model inputs.

use std::path::Path;

use serde::Deserialize;

use crate::runtime::model_dir::read_json;

/// The fields of `preprocessor_config.json` the audio extractors read.
#[derive(Debug, Clone, Deserialize)]
struct PreprocessorConfig {
    #[serde(default)]
    feature_extractor_type: Option<String>,
    #[serde(default)]
    sampling_rate: Option<u32>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    padding_value: Option<f32>,
    #[serde(default)]
    return_attention_mask: Option<bool>,
}

/// Wav2Vec2FeatureExtractor (also HuBERT's and other CTC / audio-classification models'):
/// raw samples, each utterance normalized to zero mean and unit variance.
#[derive(Debug, Clone)]
pub struct Wav2Vec2Features {
    pub sampling_rate: u32,
    pub do_normalize: bool,
    pub padding_value: f32,
    pub return_attention_mask: bool,
}

impl Wav2Vec2Features {
    /// Reads `preprocessor_config.json` (the extractor's defaults without one).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let config: Option<PreprocessorConfig> =
            read_json(&dir.join("preprocessor_config.json")).map_err(|e| e.to_string())?;
        let config = config.unwrap_or(PreprocessorConfig {
            feature_extractor_type: None,
            sampling_rate: None,
            do_normalize: None,
            padding_value: None,
            return_attention_mask: None,
        });
        if let Some(t) = &config.feature_extractor_type
            && t.contains("Whisper")
        {
            return Err(format!(
                "{}: a {t} makes log-mel features for Whisper, not the raw samples this task runs",
                dir.join("preprocessor_config.json").display()
            ));
        }
        Ok(Wav2Vec2Features {
            sampling_rate: config.sampling_rate.unwrap_or(16000),
            do_normalize: config.do_normalize.unwrap_or(true),
            padding_value: config.padding_value.unwrap_or(0.0),
            return_attention_mask: config.return_attention_mask.unwrap_or(false),
        })
    }

    /// `input_values` of one utterance: `(x - mean) / sqrt(var + 1e-7)` (population variance)
    /// when `do_normalize`, else the samples as they are.
    pub fn apply(&self, samples: &[f32]) -> Vec<f32> {
        if !self.do_normalize || samples.is_empty() {
            return samples.to_vec();
        }
        let n = samples.len() as f64;
        let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = samples
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / n;
        let (mean, denom) = (mean as f32, (var as f32 + 1e-7).sqrt());
        samples.iter().map(|&v| (v - mean) / denom).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_zero_mean_unit_variance() {
        let f = Wav2Vec2Features {
            sampling_rate: 16000,
            do_normalize: true,
            padding_value: 0.0,
            return_attention_mask: false,
        };
        let y = f.apply(&[1.0, 2.0, 3.0, 4.0]);
        // mean 2.5, population variance 1.25.
        let s = (1.25f32 + 1e-7).sqrt();
        assert_eq!(y, vec![-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]);
        // A constant clip (silence) stays finite: all zeros.
        assert!(f.apply(&[0.0; 8]).iter().all(|v| *v == 0.0));
    }
}

/// WhisperFeatureExtractor: log-mel spectrograms of 30 s windows (the torch path of
/// `_torch_extract_fbank_features`): the samples zero-padded or cut to `n_samples`, a centred
/// STFT (reflect padding, periodic Hann window of `n_fft`, hop `hop_length`) whose last frame is
/// dropped, power spectra through Slaney-normalized Slaney-scale mel filters (0 to 8 kHz),
/// `log10(max(mel, 1e-10))`, floored at the window's maximum - 8, then `(x + 4) / 4`.
pub struct WhisperFeatures {
    pub sampling_rate: u32,
    pub n_fft: usize,
    pub hop_length: usize,
    /// Samples of one window (`chunk_length` x rate: 480000).
    pub n_samples: usize,
    pub n_mels: usize,
    /// [n_mels][n_fft / 2 + 1], f32 as the torch path casts them.
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: std::sync::Arc<dyn realfft::RealToComplex<f32>>,
}

impl std::fmt::Debug for WhisperFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperFeatures")
            .field("n_mels", &self.n_mels)
            .field("n_fft", &self.n_fft)
            .field("hop_length", &self.hop_length)
            .field("n_samples", &self.n_samples)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct WhisperConfig {
    #[serde(default = "whisper_mels")]
    feature_size: usize,
    #[serde(default = "whisper_rate")]
    sampling_rate: u32,
    #[serde(default = "whisper_hop")]
    hop_length: usize,
    #[serde(default = "whisper_chunk")]
    chunk_length: usize,
    #[serde(default = "whisper_fft")]
    n_fft: usize,
}

fn whisper_mels() -> usize {
    80
}
fn whisper_rate() -> u32 {
    16000
}
fn whisper_hop() -> usize {
    160
}
fn whisper_chunk() -> usize {
    30
}
fn whisper_fft() -> usize {
    400
}

impl WhisperFeatures {
    /// Reads `preprocessor_config.json` (Whisper's defaults without one).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("preprocessor_config.json");
        let c: WhisperConfig =
            read_json(&path)
                .map_err(|e| e.to_string())?
                .unwrap_or(WhisperConfig {
                    feature_size: whisper_mels(),
                    sampling_rate: whisper_rate(),
                    hop_length: whisper_hop(),
                    chunk_length: whisper_chunk(),
                    n_fft: whisper_fft(),
                });
        if c.n_fft < 2 || c.hop_length == 0 || c.feature_size == 0 || c.sampling_rate == 0 {
            return Err(format!(
                "{}: n_fft {}, hop_length {}, feature_size {}, sampling_rate {} do not describe a log-mel extractor",
                path.display(),
                c.n_fft,
                c.hop_length,
                c.feature_size,
                c.sampling_rate
            ));
        }
        Ok(Self::new(
            c.sampling_rate,
            c.n_fft,
            c.hop_length,
            c.chunk_length * c.sampling_rate as usize,
            c.feature_size,
        ))
    }

    pub fn new(
        sampling_rate: u32,
        n_fft: usize,
        hop_length: usize,
        n_samples: usize,
        n_mels: usize,
    ) -> Self {
        let bins = n_fft / 2 + 1;
        let bank = mel_filter_bank(bins, n_mels, 0.0, 8000.0, sampling_rate as f64);
        let mut filters = vec![0f32; n_mels * bins];
        for (f, row) in bank.iter().enumerate() {
            for (m, v) in row.iter().enumerate() {
                filters[m * bins + f] = *v as f32;
            }
        }
        // torch.hann_window(n_fft): periodic.
        let window = (0..n_fft)
            .map(|i| {
                let x = std::f64::consts::PI * 2.0 * i as f64 / n_fft as f64;
                (0.5 - 0.5 * x.cos()) as f32
            })
            .collect();
        let fft = realfft::RealFftPlanner::<f32>::new().plan_fft_forward(n_fft);
        WhisperFeatures {
            sampling_rate,
            n_fft,
            hop_length,
            n_samples,
            n_mels,
            filters,
            window,
            fft,
        }
    }

    /// Frames of one window (3000 for 30 s).
    pub fn frames(&self) -> usize {
        self.n_samples / self.hop_length
    }

    /// `input_features` [n_mels, frames] of one window: `samples` padded with zeros or cut
    /// to `n_samples`.
    pub fn apply(&self, samples: &[f32]) -> Vec<f32> {
        self.apply_to(samples, self.n_samples)
    }

    /// `input_features` [n_mels, samples / hop_length] of a whole recording (at least two
    /// samples), as the extractor gives them with `padding="longest", truncation=False`: the
    /// scaling's maximum is the whole recording's.
    pub fn apply_whole(&self, samples: &[f32]) -> Vec<f32> {
        self.apply_to(samples, samples.len())
    }

    fn apply_to(&self, samples: &[f32], n: usize) -> Vec<f32> {
        let mut x = vec![0f32; n];
        let used = samples.len().min(n);
        x[..used].copy_from_slice(&samples[..used]);
        // Centre: reflect-pad n_fft / 2 on each side.
        let half = self.n_fft / 2;
        let mut padded = Vec::with_capacity(n + 2 * half);
        padded.extend((1..=half).rev().map(|i| x[i.min(n - 1)]));
        padded.extend_from_slice(&x);
        padded.extend((0..half).map(|i| x[n - 2 - i.min(n - 2)]));
        let frames = n / self.hop_length;
        let bins = self.n_fft / 2 + 1;
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; bins];
        let mut mel = vec![0f32; self.n_mels * frames];
        for t in 0..frames {
            let start = t * self.hop_length;
            for (i, v) in input.iter_mut().enumerate() {
                *v = padded[start + i] * self.window[i];
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("FFT buffers sized by the planner");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for m in 0..self.n_mels {
                let row = &self.filters[m * bins..(m + 1) * bins];
                mel[m * frames + t] = row.iter().zip(&power).map(|(f, p)| f * p).sum();
            }
        }
        let mut max = f32::NEG_INFINITY;
        for v in mel.iter_mut() {
            *v = v.max(1e-10).log10();
            max = max.max(*v);
        }
        for v in mel.iter_mut() {
            *v = (v.max(max - 8.0) + 4.0) / 4.0;
        }
        mel
    }
}

/// Slaney mel scale (`hertz_to_mel(mel_scale="slaney")`).
fn hertz_to_mel(f: f64) -> f64 {
    let logstep = 27.0 / 6.4f64.ln();
    if f >= 1000.0 {
        15.0 + (f / 1000.0).ln() * logstep
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hertz(m: f64) -> f64 {
    let logstep = 6.4f64.ln() / 27.0;
    if m >= 15.0 {
        1000.0 * (logstep * (m - 15.0)).exp()
    } else {
        200.0 * m / 3.0
    }
}

/// `mel_filter_bank(..., norm="slaney", mel_scale="slaney")`: [frequency bins][mel filters].
fn mel_filter_bank(
    bins: usize,
    n_mels: usize,
    min_hz: f64,
    max_hz: f64,
    rate: f64,
) -> Vec<Vec<f64>> {
    let (lo, hi) = (hertz_to_mel(min_hz), hertz_to_mel(max_hz));
    // np.linspace(lo, hi, n_mels + 2)
    let points = n_mels + 2;
    let filter_hz: Vec<f64> = (0..points)
        .map(|i| {
            let m = if i == points - 1 {
                hi
            } else {
                i as f64 * ((hi - lo) / (points - 1) as f64) + lo
            };
            mel_to_hertz(m)
        })
        .collect();
    // np.linspace(0, rate // 2, bins)
    let nyquist = (rate / 2.0).floor();
    let fft_hz: Vec<f64> = (0..bins)
        .map(|i| {
            if i == bins - 1 {
                nyquist
            } else {
                i as f64 * (nyquist / (bins - 1) as f64)
            }
        })
        .collect();
    let diff: Vec<f64> = filter_hz.windows(2).map(|w| w[1] - w[0]).collect();
    fft_hz
        .iter()
        .map(|&f| {
            (0..n_mels)
                .map(|m| {
                    let down = -(filter_hz[m] - f) / diff[m];
                    let up = (filter_hz[m + 2] - f) / diff[m + 1];
                    let enorm = 2.0 / (filter_hz[m + 2] - filter_hz[m]);
                    0f64.max(down.min(up)) * enorm
                })
                .collect()
        })
        .collect()
}
