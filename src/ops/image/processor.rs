//! Image processors: a decoded picture → the model's pixel tensor, as `transformers`' (slow,
//! PIL/numpy) image processors compute it from `preprocessor_config.json`: resize (Pillow) →
//! center crop → rescale (`x as f64 * factor`, then f32) → normalize (f32) → pad, channels first.
//!
//! Resize rules by processor: a fixed `{height, width}` (ViT, SegFormer), the short side with an
//! optional crop (`{shortest_edge}`, ConvNeXT's `crop_pct` below 384), DETR's shortest/longest
//! edge, GLPN's `size_divisor`, DPT's `keep_aspect_ratio` / `ensure_multiple_of`, and the
//! letterbox of YOLO exports (a ferry setting: YOLO exports carry no processor config).

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Pixels;
use super::resample::{Filter, opencv_linear, opencv_linear_padded, pil_resize};

/// `size` / `crop_size` / `pad_size` of a processor config: an int or a dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Dict {
        height: Option<usize>,
        width: Option<usize>,
        shortest_edge: Option<usize>,
        longest_edge: Option<usize>,
        max_height: Option<usize>,
        max_width: Option<usize>,
    },
}

/// The fields of `preprocessor_config.json` ferry reads.
#[derive(Debug, Clone, Default, Deserialize)]
struct HfConfig {
    image_processor_type: Option<String>,
    feature_extractor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    max_size: Option<usize>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    crop_pct: Option<f64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    do_pad: Option<bool>,
    pad_size: Option<SizeSpec>,
    size_divisor: Option<usize>,
    keep_aspect_ratio: Option<bool>,
    ensure_multiple_of: Option<usize>,
}

/// Where a letterboxed image sits in its square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LetterboxPlacement {
    /// Centred, padding split evenly (Ultralytics).
    Center,
    /// At the top left, padding right and bottom.
    TopLeft,
}

/// A letterbox resize (YOLO): the image scaled to fit `size` x `size` keeping its aspect
/// ratio, the rest filled with `fill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Letterbox {
    /// The square's side. Default: the model input's fixed size.
    #[serde(default)]
    pub size: Option<usize>,
    /// `center` (Ultralytics' default) or `top_left`.
    #[serde(default = "default_placement")]
    pub placement: LetterboxPlacement,
    /// The padding's grey level, 0-255 (Ultralytics: 114).
    #[serde(default = "default_fill")]
    pub fill: u8,
    /// Pad to a square first and resize that square (the image keeps its place at the top
    /// left; NudeNet's own preprocessing), instead of resizing and then padding.
    #[serde(default)]
    pub pad_then_resize: bool,
    /// How the image is resized: `opencv` (OpenCV's bilinear without antialiasing, as
    /// Ultralytics and most YOLO pipelines resize) or `pil` (Pillow's filter of `resample`).
    #[serde(default = "default_letterbox_resize")]
    pub resize: LetterboxResize,
}

/// The resize of a letterbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LetterboxResize {
    Opencv,
    Pil,
}

fn default_letterbox_resize() -> LetterboxResize {
    LetterboxResize::Opencv
}

fn default_placement() -> LetterboxPlacement {
    LetterboxPlacement::Center
}

fn default_fill() -> u8 {
    114
}

/// Overrides of the model's `preprocessor_config.json` (or the whole configuration, for models
/// that have none). Each field replaces the config's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessorOptions {
    /// Resize to exactly `[height, width]`.
    #[serde(default)]
    pub size: Option<[usize; 2]>,
    /// Resize the short side to this, keeping the aspect ratio.
    #[serde(default)]
    pub shortest_edge: Option<usize>,
    /// Center-crop to `[height, width]` after resizing.
    #[serde(default)]
    pub crop_size: Option<[usize; 2]>,
    /// Letterbox to a square (YOLO exports).
    #[serde(default)]
    pub letterbox: Option<Letterbox>,
    /// PIL filter number: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming.
    #[serde(default)]
    pub resample: Option<i64>,
    /// Multiply pixel values (0-255) by this; 1 keeps them as they are.
    #[serde(default)]
    pub rescale_factor: Option<f64>,
    /// Per-channel mean subtracted after rescaling (in the model's channel order).
    #[serde(default)]
    pub image_mean: Option<Vec<f64>>,
    /// Per-channel standard deviation divided by after subtracting the mean.
    #[serde(default)]
    pub image_std: Option<Vec<f64>>,
    /// Channel order the model expects: `rgb` (default) or `bgr` (Caffe-style models).
    #[serde(default)]
    pub channel_order: Option<ChannelOrder>,
}

/// Channel order of the pixel tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// How the picture is brought to the model's size.
#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    None,
    /// Exactly this size.
    Exact {
        height: usize,
        width: usize,
    },
    /// The short side to `shortest` (torchvision's rule), the long side truncated.
    ShortestEdge {
        shortest: usize,
    },
    /// ConvNeXT: below 384, the short side to `shortest / crop_pct`, then a center crop.
    ConvNext {
        shortest: usize,
        crop_pct: f64,
    },
    /// DETR: the short side to `shortest` unless the long side would pass `longest`.
    ShortLong {
        shortest: usize,
        longest: usize,
    },
    /// Fit inside `max_height` x `max_width` keeping the aspect ratio.
    MaxHeightWidth {
        max_height: usize,
        max_width: usize,
    },
    /// GLPN: each side down to a multiple of `divisor`.
    Divisor {
        divisor: usize,
    },
    /// DPT: towards `height` x `width`, optionally keeping the aspect ratio, each side a
    /// multiple of `multiple`.
    Dpt {
        height: usize,
        width: usize,
        keep_aspect_ratio: bool,
        multiple: usize,
    },
    Letterbox(Letterbox),
}

/// How the picture's pixels are laid out in the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[batch, channels, height, width]`.
    Nchw,
    /// `[batch, height, width, channels]`.
    Nhwc,
}

/// Padding after normalization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pad {
    None,
    /// To a fixed size, at the bottom and right (DETR's `pad_size`), with a pixel mask.
    To {
        height: usize,
        width: usize,
    },
    /// Each side up to a multiple, split evenly (DPT's `size_divisor`).
    Multiple(usize),
}

/// A resolved image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Processor {
    pub resize: Resize,
    pub filter: Filter,
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
    pub pad: Pad,
    pub channels: ChannelOrder,
    pub layout: Layout,
}

/// A preprocessed picture: `height x width` pixels in the model's layout, with a mask of the
/// real (unpadded) pixels, and where it came from.
#[derive(Debug, Clone)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// 1 for image pixels, 0 for padding (`pixel_mask`), row-major `height x width`.
    pub mask: Option<Vec<i64>>,
    /// The decoded image's size before any resizing.
    pub original: (usize, usize),
    /// Letterbox geometry: the scale applied and the offset (x, y) of the image in the square.
    pub letterbox: Option<(f64, f64, f64)>,
}

const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
const IMAGENET_STANDARD: [f64; 3] = [0.5, 0.5, 0.5];

impl Processor {
    /// Reads `preprocessor_config.json` from `dir` (if there is one), applies `options`, and
    /// fills what is still unknown from the model input's fixed size (`input_hw`).
    pub fn load(
        dir: &Path,
        options: &ProcessorOptions,
        input_hw: Option<(usize, usize)>,
        layout: Layout,
    ) -> Result<Self, String> {
        let path = dir.join("preprocessor_config.json");
        let config: Option<HfConfig> = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Self::resolve(config.as_ref(), options, input_hw, layout)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn resolve(
        config: Option<&HfConfig>,
        options: &ProcessorOptions,
        input_hw: Option<(usize, usize)>,
        layout: Layout,
    ) -> Result<Self, String> {
        let default = HfConfig::default();
        let c = config.unwrap_or(&default);
        let kind = c
            .image_processor_type
            .as_deref()
            .or(c.feature_extractor_type.as_deref())
            .unwrap_or("")
            .trim_end_matches("Fast")
            .trim_end_matches("ImageProcessor")
            .trim_end_matches("FeatureExtractor")
            .to_string();
        // Each processor's defaults for fields its config may leave out.
        let (default_filter, default_norm, default_to_square) = match kind.as_str() {
            "DPT" => (3, Some(IMAGENET_STANDARD), true),
            "ViT" => (2, Some(IMAGENET_STANDARD), true),
            "ConvNext" | "Detr" | "Segformer" | "ConditionalDetr" | "DeformableDetr" => (
                2,
                Some(IMAGENET_DEFAULT_MEAN),
                kind != "ConvNext" && !kind.contains("Detr"),
            ),
            "GLPN" => (2, None, true),
            _ => (2, Some(IMAGENET_STANDARD), true),
        };
        let resize = if let Some(l) = &options.letterbox {
            Resize::Letterbox(l.clone())
        } else if let Some([height, width]) = options.size {
            Resize::Exact { height, width }
        } else if let Some(shortest) = options.shortest_edge {
            Resize::ShortestEdge { shortest }
        } else if c.do_resize == Some(false) {
            Resize::None
        } else {
            Self::hf_resize(&kind, c, default_to_square, input_hw)?
        };
        let filter_number =
            options
                .resample
                .or(c.resample)
                .unwrap_or(if matches!(resize, Resize::Letterbox(_)) {
                    2
                } else {
                    default_filter
                });
        let filter = Filter::from_pil(filter_number)
            .ok_or_else(|| format!("resample {filter_number} is not a PIL filter (0-5)"))?;
        let crop = match options.crop_size {
            Some([h, w]) => Some((h, w)),
            None if c.do_center_crop.unwrap_or(false) => match &c.crop_size {
                Some(SizeSpec::Int(s)) => Some((*s, *s)),
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) => Some((*h, *w)),
                Some(other) => return Err(format!("crop_size {other:?} needs height and width")),
                None => None,
            },
            None => None,
        };
        let rescale = match options.rescale_factor {
            Some(f) => (f != 1.0).then_some(f),
            None if c.do_rescale.unwrap_or(true) => Some(c.rescale_factor.unwrap_or(1.0 / 255.0)),
            None => None,
        };
        let three = |v: &[f64], what: &str| -> Result<[f32; 3], String> {
            match v {
                [x] => Ok([*x as f32; 3]),
                [a, b, d] => Ok([*a as f32, *b as f32, *d as f32]),
                _ => Err(format!("{what} needs 1 or 3 values, got {}", v.len())),
            }
        };
        let normalize = if options.image_mean.is_some() || options.image_std.is_some() {
            let mean = options.image_mean.clone().unwrap_or(vec![0.0]);
            let std = options.image_std.clone().unwrap_or(vec![1.0]);
            Some((three(&mean, "image_mean")?, three(&std, "image_std")?))
        } else if config.is_some() && c.do_normalize.unwrap_or(default_norm.is_some()) {
            // (Without a processor config, e.g. a YOLO export, pixels are only rescaled.)
            let fallback = default_norm.unwrap_or(IMAGENET_STANDARD);
            let default_std = if fallback == IMAGENET_DEFAULT_MEAN {
                IMAGENET_DEFAULT_STD
            } else {
                IMAGENET_STANDARD
            };
            let mean = c.image_mean.clone().unwrap_or(fallback.to_vec());
            let std = c.image_std.clone().unwrap_or(default_std.to_vec());
            Some((three(&mean, "image_mean")?, three(&std, "image_std")?))
        } else {
            None
        };
        let pad = if matches!(resize, Resize::Letterbox(_)) {
            Pad::None
        } else if kind.contains("Detr") && c.do_pad.unwrap_or(true) {
            match &c.pad_size {
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) => Pad::To {
                    height: *h,
                    width: *w,
                },
                _ => Pad::None,
            }
        } else if kind == "DPT" && c.do_pad.unwrap_or(false) {
            Pad::Multiple(c.size_divisor.unwrap_or(1).max(1))
        } else {
            Pad::None
        };
        Ok(Processor {
            resize,
            filter,
            crop,
            rescale,
            normalize,
            pad,
            channels: options.channel_order.unwrap_or(ChannelOrder::Rgb),
            layout,
        })
    }

    fn hf_resize(
        kind: &str,
        c: &HfConfig,
        default_to_square: bool,
        input_hw: Option<(usize, usize)>,
    ) -> Result<Resize, String> {
        if kind == "GLPN" {
            return Ok(Resize::Divisor {
                divisor: c.size_divisor.unwrap_or(32).max(1),
            });
        }
        let size = match (&c.size, kind) {
            (Some(s), _) => s.clone(),
            (None, "ConvNext") => SizeSpec::Int(384),
            (None, k) if k.contains("Detr") => SizeSpec::Dict {
                height: None,
                width: None,
                shortest_edge: Some(800),
                longest_edge: Some(c.max_size.unwrap_or(1333)),
                max_height: None,
                max_width: None,
            },
            (None, "Segformer") => SizeSpec::Int(512),
            (None, "DPT") => SizeSpec::Int(384),
            (None, _) => match input_hw {
                Some((h, w)) => SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    shortest_edge: None,
                    longest_edge: None,
                    max_height: None,
                    max_width: None,
                },
                None => SizeSpec::Int(224),
            },
        };
        // get_size_dict: an int is a square, or the short side where the processor says so.
        let (height, width, shortest, longest, max_h, max_w) = match size {
            SizeSpec::Int(s) if default_to_square => (Some(s), Some(s), None, None, None, None),
            SizeSpec::Int(s) => (None, None, Some(s), c.max_size, None, None),
            SizeSpec::Dict {
                height,
                width,
                shortest_edge,
                longest_edge,
                max_height,
                max_width,
            } => (
                height,
                width,
                shortest_edge,
                longest_edge,
                max_height,
                max_width,
            ),
        };
        Ok(match (height, width, shortest, longest, max_h, max_w) {
            (Some(h), Some(w), ..) if kind == "DPT" => Resize::Dpt {
                height: h,
                width: w,
                keep_aspect_ratio: c.keep_aspect_ratio.unwrap_or(false),
                multiple: c.ensure_multiple_of.unwrap_or(1).max(1),
            },
            (Some(height), Some(width), ..) => Resize::Exact { height, width },
            (_, _, Some(shortest), _, _, _) if kind == "ConvNext" => Resize::ConvNext {
                shortest,
                crop_pct: c.crop_pct.unwrap_or(224.0 / 256.0),
            },
            (_, _, Some(shortest), Some(longest), _, _) => Resize::ShortLong { shortest, longest },
            (_, _, Some(shortest), None, _, _) => Resize::ShortestEdge { shortest },
            (_, _, _, _, Some(max_height), Some(max_width)) => Resize::MaxHeightWidth {
                max_height,
                max_width,
            },
            _ => return Err("cannot tell the resize from `size`".into()),
        })
    }

    /// About how many bytes one preprocessed picture takes (f32 x 3 channels), for bounding
    /// how many are held at once.
    pub fn typical_bytes(&self) -> usize {
        let pixels = match (&self.crop, &self.resize) {
            (Some((h, w)), _) => h * w,
            (_, Resize::Exact { height, width }) => height * width,
            (_, Resize::Dpt { height, width, .. }) => height * width,
            (_, Resize::ShortestEdge { shortest } | Resize::ConvNext { shortest, .. }) => {
                shortest * shortest * 2
            }
            (_, Resize::ShortLong { shortest, longest }) => shortest * longest,
            (
                _,
                Resize::MaxHeightWidth {
                    max_height,
                    max_width,
                },
            ) => max_height * max_width,
            (_, Resize::Letterbox(l)) => l.size.unwrap_or(640).pow(2),
            (_, Resize::None | Resize::Divisor { .. }) => 1024 * 1024,
        };
        pixels.max(1) * 12
    }

    /// The (height, width) the picture is resized to.
    fn target(&self, h: usize, w: usize) -> Result<(usize, usize), String> {
        let (hf, wf) = (h as f64, w as f64);
        Ok(match &self.resize {
            Resize::None | Resize::Letterbox(_) => (h, w),
            Resize::Exact { height, width } => (*height, *width),
            Resize::ShortestEdge { shortest } => short_side(h, w, *shortest),
            Resize::ConvNext { shortest, crop_pct } => {
                if *shortest < 384 {
                    short_side(h, w, (*shortest as f64 / crop_pct) as usize)
                } else {
                    (*shortest, *shortest)
                }
            }
            Resize::ShortLong { shortest, longest } => detr_size(h, w, *shortest, *longest),
            Resize::MaxHeightWidth {
                max_height,
                max_width,
            } => {
                let scale = (*max_height as f64 / hf).min(*max_width as f64 / wf);
                ((hf * scale) as usize, (wf * scale) as usize)
            }
            Resize::Divisor { divisor } => (h / divisor * divisor, w / divisor * divisor),
            Resize::Dpt {
                height,
                width,
                keep_aspect_ratio,
                multiple,
            } => {
                let mut sh = *height as f64 / hf;
                let mut sw = *width as f64 / wf;
                if *keep_aspect_ratio {
                    if (1.0 - sw).abs() < (1.0 - sh).abs() {
                        sh = sw;
                    } else {
                        sw = sh;
                    }
                }
                (
                    constrain_to_multiple(sh * hf, *multiple),
                    constrain_to_multiple(sw * wf, *multiple),
                )
            }
        })
    }

    /// Preprocesses one RGB picture.
    pub fn apply(&self, image: &Pixels) -> Result<PixelValues, String> {
        let original = (image.height, image.width);
        let mut letterbox = None;
        let resized = if let Resize::Letterbox(l) = &self.resize {
            let side = l
                .size
                .ok_or("letterbox.size is not set and the model's input size is dynamic")?;
            let (pixels, geometry) = letterbox_image(image, side, l, self.filter);
            letterbox = Some(geometry);
            pixels
        } else {
            let (h, w) = self.target(image.height, image.width)?;
            if h == 0 || w == 0 {
                return Err(format!(
                    "the image ({}x{}) is too small for this model's processor (it would be resized to {w}x{h})",
                    image.width, image.height
                ));
            }
            pil_resize(image, w, h, self.filter)
        };
        let pixels = match (self.crop, &self.resize) {
            (_, Resize::ConvNext { shortest, .. }) if *shortest < 384 => {
                center_crop(&resized, *shortest, *shortest)
            }
            (Some((h, w)), _) => center_crop(&resized, h, w),
            _ => resized,
        };
        let (h, w) = (pixels.height, pixels.width);
        // Each channel's 256 possible values, computed as the processor does (rescale: float64
        // multiply, then float32; normalize in float32), then looked up per pixel.
        let source_channel = |c: usize| match self.channels {
            ChannelOrder::Rgb => c,
            ChannelOrder::Bgr => 2 - c,
        };
        let table: Vec<[f32; 256]> = (0..3)
            .map(|c| {
                std::array::from_fn(|v| {
                    let x = match self.rescale {
                        Some(f) => (v as f64 * f) as f32,
                        None => v as f32,
                    };
                    match self.normalize {
                        Some((mean, std)) => (x - mean[c]) / std[c],
                        None => x,
                    }
                })
            })
            .collect();
        let (ph, pw, top, left) = match self.pad {
            Pad::None => (h, w, 0, 0),
            Pad::To { height, width } => (height.max(h), width.max(w), 0, 0),
            Pad::Multiple(m) => {
                let (nh, nw) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
                (nh, nw, (nh - h) / 2, (nw - w) / 2)
            }
        };
        let mut data = vec![0f32; 3 * ph * pw];
        match self.layout {
            Layout::Nchw => {
                for (c, plane) in data.chunks_exact_mut(ph * pw).enumerate() {
                    let (table, sc) = (&table[c], source_channel(c));
                    for (y, line) in pixels.data.chunks_exact(w * 3).enumerate() {
                        let out = &mut plane[(y + top) * pw + left..][..w];
                        for (o, px) in out.iter_mut().zip(line.chunks_exact(3)) {
                            *o = table[px[sc] as usize];
                        }
                    }
                }
            }
            Layout::Nhwc => {
                for (y, line) in pixels.data.chunks_exact(w * 3).enumerate() {
                    let out = &mut data[((y + top) * pw + left) * 3..][..w * 3];
                    for (o, px) in out.chunks_exact_mut(3).zip(line.chunks_exact(3)) {
                        for c in 0..3 {
                            o[c] = table[c][px[source_channel(c)] as usize];
                        }
                    }
                }
            }
        }
        let mask = matches!(self.pad, Pad::To { .. }).then(|| {
            let mut m = vec![0i64; ph * pw];
            for y in 0..h {
                m[y * pw..y * pw + w].fill(1);
            }
            m
        });
        Ok(PixelValues {
            data,
            height: ph,
            width: pw,
            mask,
            original,
            letterbox,
        })
    }
}

/// torchvision's short-side rule as `get_resize_output_image_size(default_to_square=False)`:
/// the short side to `size`, the long side `int(size * long / short)`.
fn short_side(h: usize, w: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// DETR's `get_size_with_aspect_ratio`.
fn detr_size(h: usize, w: usize, size: usize, max_size: usize) -> (usize, usize) {
    let (hf, wf) = (h as f64, w as f64);
    let mut size = size;
    let mut raw_size = None;
    let (min_o, max_o) = (hf.min(wf), hf.max(wf));
    if max_o / min_o * size as f64 > max_size as f64 {
        let raw = max_size as f64 * min_o / max_o;
        raw_size = Some(raw);
        size = raw.round_ties_even() as usize;
    }
    if (h <= w && h == size) || (w <= h && w == size) {
        (h, w)
    } else if w < h {
        let oh = match raw_size {
            Some(raw) => (raw * hf / wf) as usize,
            None => (size as f64 * hf / wf) as usize,
        };
        (oh, size)
    } else {
        let ow = match raw_size {
            Some(raw) => (raw * wf / hf) as usize,
            None => (size as f64 * wf / hf) as usize,
        };
        (size, ow)
    }
}

/// DPT's `constrain_to_multiple_of` (Python's round: half to even).
fn constrain_to_multiple(v: f64, multiple: usize) -> usize {
    let m = multiple as f64;
    let x = (v / m).round_ties_even() * m;
    if x < 0.0 {
        ((v / m).ceil() * m) as usize
    } else {
        x as usize
    }
}

/// `image_transforms.center_crop`: top/left by floor division, zero padding where the image
/// is smaller than the crop.
pub fn center_crop(p: &Pixels, ch: usize, cw: usize) -> Pixels {
    if ch > p.height || cw > p.width {
        return padded_center_crop(p, ch, cw);
    }
    let c = p.channels;
    let (top, left) = ((p.height - ch) / 2, (p.width - cw) / 2);
    let mut out = Vec::with_capacity(ch * cw * c);
    for y in top..top + ch {
        let s = (y * p.width + left) * c;
        out.extend_from_slice(&p.data[s..s + cw * c]);
    }
    Pixels::new(cw, ch, c, out)
}

/// `center_crop` when the image is smaller than the crop in some dimension.
fn padded_center_crop(p: &Pixels, ch: usize, cw: usize) -> Pixels {
    let (h, w, c) = (p.height, p.width, p.channels);
    let (nh, nw) = (ch.max(h), cw.max(w));
    let (top_pad, left_pad) = ((nh - h).div_ceil(2), (nw - w).div_ceil(2));
    // The padded canvas.
    let mut canvas = vec![0u8; nh * nw * c];
    for y in 0..h {
        let d = ((y + top_pad) * nw + left_pad) * c;
        canvas[d..d + w * c].copy_from_slice(&p.data[y * w * c..(y + 1) * w * c]);
    }
    let top = (h as i64 - ch as i64).div_euclid(2) + top_pad as i64;
    let left = (w as i64 - cw as i64).div_euclid(2) + left_pad as i64;
    let (t0, t1) = (top.max(0) as usize, ((top + ch as i64) as usize).min(nh));
    let (l0, l1) = (left.max(0) as usize, ((left + cw as i64) as usize).min(nw));
    let (oh, ow) = (t1 - t0, l1 - l0);
    let mut out = vec![0u8; oh * ow * c];
    for y in 0..oh {
        let s = ((y + t0) * nw + l0) * c;
        out[y * ow * c..(y + 1) * ow * c].copy_from_slice(&canvas[s..s + ow * c]);
    }
    Pixels::new(ow, oh, c, out)
}

/// Letterboxes `image` into a `side` x `side` square; returns the pixels and (scale, dx, dy):
/// a model coordinate maps back to the image as `(x - dx) / scale`.
fn letterbox_image(
    image: &Pixels,
    side: usize,
    l: &Letterbox,
    filter: Filter,
) -> (Pixels, (f64, f64, f64)) {
    let (h, w) = (image.height, image.width);
    let resize = |p: &Pixels, nw: usize, nh: usize| match l.resize {
        LetterboxResize::Opencv => opencv_linear(p, nw, nh),
        LetterboxResize::Pil => pil_resize(p, nw, nh, filter),
    };
    let fill = |len: usize| vec![l.fill; len];
    if l.pad_then_resize {
        // Pad to a square at the top left, then resize the square.
        let s = h.max(w);
        if l.resize == LetterboxResize::Opencv {
            let resized = opencv_linear_padded(image, (s, s), l.fill, side, side);
            return (resized, (side as f64 / s as f64, 0.0, 0.0));
        }
        let mut square = fill(s * s * 3);
        for y in 0..h {
            square[y * s * 3..y * s * 3 + w * 3]
                .copy_from_slice(&image.data[y * w * 3..(y + 1) * w * 3]);
        }
        let square = Pixels::new(s, s, 3, square);
        let resized = resize(&square, side, side);
        return (resized, (side as f64 / s as f64, 0.0, 0.0));
    }
    let scale = (side as f64 / h as f64).min(side as f64 / w as f64);
    let nw = ((w as f64 * scale).round() as usize).clamp(1, side);
    let nh = ((h as f64 * scale).round() as usize).clamp(1, side);
    let resized = resize(image, nw, nh);
    let (dx, dy) = match l.placement {
        LetterboxPlacement::TopLeft => (0, 0),
        LetterboxPlacement::Center => ((side - nw) / 2, (side - nh) / 2),
    };
    let mut out = fill(side * side * 3);
    for y in 0..nh {
        let d = ((y + dy) * side + dx) * 3;
        out[d..d + nw * 3].copy_from_slice(&resized.data[y * nw * 3..(y + 1) * nw * 3]);
    }
    (
        Pixels::new(side, side, 3, out),
        (scale, dx as f64, dy as f64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers_rules() {
        // get_resize_output_image_size(default_to_square=False): long side truncated.
        assert_eq!(short_side(300, 451, 224), (224, 336));
        assert_eq!(short_side(451, 300, 224), (336, 224));
        // DETR: 800 short side unless the long side passes 1333.
        assert_eq!(detr_size(400, 600, 800, 1333), (800, 1200));
        assert_eq!(detr_size(427, 640, 800, 1333), (800, 1199));
        assert_eq!(detr_size(100, 1000, 800, 1333), (133, 1333));
        // DPT's multiples use Python's round (half to even).
        assert_eq!(constrain_to_multiple(232.0, 16), 224);
        assert_eq!(constrain_to_multiple(248.0, 16), 256);
        assert_eq!(constrain_to_multiple(40.0, 32), 32);
    }

    #[test]
    fn center_crop_pads_small_images_like_numpy() {
        // A 1x3 image cropped to 3x3: centred row, zero rows above and below.
        let p = Pixels::new(3, 1, 1, vec![1, 2, 3]);
        let c = center_crop(&p, 3, 3);
        assert_eq!(c.data, vec![0, 0, 0, 1, 2, 3, 0, 0, 0]);
        // A 4x4 image cropped to 2x2 keeps the middle.
        let p = Pixels::new(4, 4, 1, (0..16).collect());
        assert_eq!(center_crop(&p, 2, 2).data, vec![5, 6, 9, 10]);
    }
}
