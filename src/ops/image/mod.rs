//! Image input for every image task: reading image arguments (bytes or paths), decoding, and the
//! image processors that turn a picture into `pixel_values`.
//!
//! Decoding reproduces what `transformers`' `load_image` gets from Pillow: EXIF orientation
//! applied (`ImageOps.exif_transpose`), then `convert("RGB")` with Pillow's rules for every mode
//! (alpha dropped, 16-bit samples reduced as Pillow reduces them, CMYK through its formula).
//! JPEG goes through libjpeg-turbo's decoder (the `mozjpeg` crate, a libjpeg-turbo fork) with
//! Pillow's settings, so pixels match Pillow's bit for bit; zune-jpeg, the `image` crate's
//! decoder, differed by up to 4 levels on the test images. Other formats use the `image` crate.

pub mod processor;
pub mod resample;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use ort::value::TensorElementType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::core::{ArgColumn, MODEL, RowErrors, Task};
use crate::runtime::ModelDir;
use crate::runtime::pool::{SessionInfo, TensorInfo, Worker};
use crate::runtime::tensor::{Data, Input, Output, read_named};
use processor::{Layout, PixelValues, Processor, ProcessorOptions};
pub use resample::Pixels;

/// How an image operator reads and preprocesses its images (the `image` task option).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageOptions {
    /// Refuse images with more pixels than this, before decoding them (default 178956970,
    /// Pillow's limit).
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Directories that path arguments may name (default: the working directory).
    #[serde(default)]
    pub allow_roots: Vec<PathBuf>,
    /// Overrides of the model's `preprocessor_config.json` (or the whole preprocessing, for
    /// models without one).
    #[serde(default)]
    pub preprocess: ProcessorOptions,
}

/// The model's image input, its processor and how images are read, resolved at plan time.
#[derive(Debug)]
pub struct ImageModel {
    pub reading: ImageReading,
    pub processor: Processor,
    /// The float image input (`pixel_values`, or a non-HF export's own name).
    input: String,
    /// `pixel_mask`, when the model takes one (DETR).
    mask: Option<String>,
    /// The model's outputs (tasks pick theirs at plan time).
    pub outputs: Vec<TensorInfo>,
    /// The model's custom metadata (YOLO exports' class `names`).
    pub metadata: std::collections::HashMap<String, String>,
}

impl ImageModel {
    /// Finds the model's image input (a 4-d float tensor; `pixel_mask` beside it), its layout
    /// and any fixed size, and loads the processor.
    pub fn open(
        task: &'static str,
        model: &ModelDir,
        session: &SessionInfo,
        options: &ImageOptions,
    ) -> Result<Self, OpError> {
        let mut image = None;
        let mut mask = None;
        for input in &session.inputs {
            let float = matches!(
                input.element,
                Some(TensorElementType::Float32 | TensorElementType::Float16)
            );
            match input.name.as_str() {
                "pixel_mask" => mask = Some(input.name.clone()),
                _ if float && input.shape.len() == 4 && image.is_none() => image = Some(input),
                other => {
                    return Err(OpError::Model(format!(
                        "{}: the model expects an input '{other}' ({:?}, shape {:?}) that the {task} task cannot provide \
                         (an image model takes pixel values [batch, 3, height, width] and optionally pixel_mask); \
                         is this the right model for the task?",
                        session.path.display(),
                        input.element,
                        input.shape
                    )));
                }
            }
        }
        let image = image.ok_or_else(|| {
            OpError::Model(format!(
                "{}: the model has no image input (a 4-d float tensor; it has {}); the {task} task needs an image model",
                session.path.display(),
                session.input_names()
            ))
        })?;
        let shape = &image.shape;
        let layout = if shape[1] != 3 && shape[3] == 3 {
            Layout::Nhwc
        } else {
            Layout::Nchw
        };
        let (h, w) = match layout {
            Layout::Nchw => (shape[2], shape[3]),
            Layout::Nhwc => (shape[1], shape[2]),
        };
        let input_hw = (h > 0 && w > 0).then_some((h as usize, w as usize));
        let mut preprocess = options.preprocess.clone();
        if let Some(l) = preprocess.letterbox.as_mut()
            && l.size.is_none()
        {
            // The input's fixed size, else Ultralytics' `imgsz` metadata ("[320, 320]").
            let imgsz = session.metadata.get("imgsz").and_then(|v| {
                v.trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .next()
                    .and_then(|n| n.trim().parse().ok())
            });
            l.size = input_hw.map(|(h, _)| h).or(imgsz);
            if l.size.is_none() {
                return Err(OpError::Options(format!(
                    "{}: the model's input size is dynamic and it has no `imgsz` metadata; set options.image.preprocess.letterbox.size",
                    session.path.display()
                )));
            }
        }
        let processor =
            Processor::load(&model.dir, &preprocess, input_hw, layout).map_err(OpError::Model)?;
        let reading = ImageReading::new(options.max_pixels, &options.allow_roots)
            .map_err(OpError::Options)?;
        Ok(ImageModel {
            reading,
            processor,
            input: image.name.clone(),
            mask,
            outputs: session.outputs.clone(),
            metadata: session.metadata.clone(),
        })
    }

    /// The model inputs of one call: the pictures stacked (all one size), and the mask.
    pub fn inputs(&self, items: &[&PixelValues]) -> Vec<Input> {
        let (h, w) = (items[0].height, items[0].width);
        let shape = match self.processor.layout {
            Layout::Nchw => vec![items.len() as i64, 3, h as i64, w as i64],
            Layout::Nhwc => vec![items.len() as i64, h as i64, w as i64, 3],
        };
        let mut data = Vec::with_capacity(items.len() * 3 * h * w);
        for it in items {
            data.extend_from_slice(&it.data);
        }
        let mut inputs = vec![Input::new(self.input.clone(), shape, Data::F32(data))];
        if let Some(name) = &self.mask {
            let mut mask = Vec::with_capacity(items.len() * h * w);
            for it in items {
                match &it.mask {
                    Some(m) => mask.extend_from_slice(m),
                    None => mask.extend(std::iter::repeat_n(1i64, h * w)),
                }
            }
            inputs.push(Input::new(
                name.clone(),
                vec![items.len() as i64, h as i64, w as i64],
                Data::I64(mask),
            ));
        }
        inputs
    }
}

/// What an image task kind supplies.
pub trait ImageTask: Send + Sync + 'static {
    /// What the worker keeps of one image's outputs (cheap to extract; the worker holds the
    /// session meanwhile).
    type Raw: Send + 'static;
    /// What one image's outputs become.
    type Out: Send + 'static;
    /// The Arrow type of the operator's output column.
    fn output_type(&self) -> DataType;
    /// The model outputs (read as f32, by name) that [`ImageTask::postprocess`] reads, in order.
    fn outputs(&self) -> &[String];
    /// Takes one call's outputs apart, one result per picture of the call (on the worker).
    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        pictures: &[&PixelValues],
    ) -> Result<Vec<Self::Raw>, String>;
    /// Finishes one picture's result (on every core, off the worker: upsampling, encoding).
    fn finish(&self, raw: Self::Raw) -> Result<Self::Out, String>;
    /// Builds the output column; None rows are nulls.
    fn to_array(&self, rows: Vec<Option<Self::Out>>) -> Result<ArrayRef>;
}

/// An image task as a core task: rows are images, items are preprocessed pictures, and a
/// picture's cost is its pixel count. Pictures of different sizes never share a call (padding
/// would change what the model sees).
pub struct ImageOp<T: ImageTask> {
    pub model: ImageModel,
    pub task: T,
}

/// Prepared pixel bytes of the rows prepared at once (each wave's pictures are held together).
const WAVE_BYTES: usize = 256 << 20;

impl<T: ImageTask> Task for ImageOp<T> {
    type Input = ImageInput;
    type Item = PixelValues;
    type Out = T::Raw;
    type Row = T::Out;

    fn output_type(&self) -> DataType {
        self.task.output_type()
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<ImageInput>>> {
        self.model.reading.read(&args[0], errors)
    }

    fn prepare(&self, input: &ImageInput) -> Result<Vec<PixelValues>, String> {
        let pixels = self.model.reading.load(input)?;
        Ok(vec![self.model.processor.apply(&pixels)?])
    }

    fn cost(&self, item: &PixelValues) -> usize {
        item.height * item.width
    }

    fn batch_key(&self, item: &PixelValues) -> u64 {
        ((item.height as u64) << 32) | item.width as u64
    }

    fn feed(&self, items: &[&PixelValues]) -> Result<Vec<Input>, String> {
        Ok(self.model.inputs(items))
    }

    fn run(&self, worker: &mut Worker, items: &[&PixelValues]) -> Result<Vec<T::Raw>, String> {
        let outputs = worker.run_selected(MODEL, self.model.inputs(items), self.task.outputs())?;
        let views = read_named(&outputs, self.task.outputs())?;
        self.task.postprocess(&views, items)
    }

    fn finish(&self, _input: &ImageInput, mut outs: Vec<T::Raw>) -> Result<T::Out, String> {
        match (outs.pop(), outs.is_empty()) {
            (Some(o), true) => self.task.finish(o),
            _ => Err("expected one result per image".into()),
        }
    }

    fn to_array(&self, rows: Vec<Option<T::Out>>) -> Result<ArrayRef> {
        self.task.to_array(rows)
    }

    fn wave_rows(&self) -> usize {
        (WAVE_BYTES / self.model.processor.typical_bytes()).clamp(4, 256)
    }
}

/// Images with more pixels than this are refused before they are decoded (a decompression
/// bomb declares a huge size in a few bytes). Pillow's own error threshold.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// One row's image: the bytes of a Binary column (kept in the column, not copied) or a path.
#[derive(Debug, Clone)]
pub enum ImageInput {
    Bytes { array: ArrayRef, row: usize },
    Path(String),
}

/// How image arguments are read.
#[derive(Debug, Clone)]
pub struct ImageReading {
    /// Refuse images with more pixels than this.
    pub max_pixels: u64,
    /// Paths are read only under these directories (canonical).
    pub allow_roots: Vec<PathBuf>,
}

impl ImageReading {
    /// `allow_roots` relative to the working directory; each must exist.
    pub fn new(max_pixels: Option<u64>, allow_roots: &[PathBuf]) -> Result<Self, String> {
        let roots = if allow_roots.is_empty() {
            vec![PathBuf::from(".")]
        } else {
            allow_roots.to_vec()
        };
        let allow_roots = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| format!("allow_roots: {}: {e}", r.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(ImageReading {
            max_pixels: max_pixels.unwrap_or(DEFAULT_MAX_PIXELS),
            allow_roots,
        })
    }

    /// Reads each row's image argument: Binary values stay in their column; strings are paths
    /// (or `file://` URIs).
    pub fn read(&self, arg: &ArgColumn<'_>, errors: &RowErrors) -> Result<Vec<Option<ImageInput>>> {
        let array = arg.array;
        let n = array.len();
        let bytes = |array: &ArrayRef| -> Vec<Option<ImageInput>> {
            (0..n)
                .map(|row| {
                    array.is_valid(row).then(|| ImageInput::Bytes {
                        array: array.clone(),
                        row,
                    })
                })
                .collect()
        };
        let paths = |it: &mut dyn Iterator<Item = Option<&str>>| -> Vec<Option<ImageInput>> {
            it.map(|v| v.map(|p| ImageInput::Path(p.to_string())))
                .collect()
        };
        Ok(match array.data_type() {
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => bytes(array),
            DataType::Utf8 => paths(&mut array.as_string::<i32>().iter()),
            DataType::LargeUtf8 => paths(&mut array.as_string::<i64>().iter()),
            DataType::Utf8View => paths(&mut array.as_string_view().iter()),
            DataType::Null => vec![None; n],
            other => {
                let _ = errors;
                return exec_err!("cannot read images from a {other} column '{}'", arg.field);
            }
        })
    }

    /// The file a path argument names, if it may be read.
    pub(crate) fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        let path = path.strip_prefix("file://").unwrap_or(path);
        if path.is_empty() {
            return Err("empty path".into());
        }
        if path.contains('\0') {
            return Err("the path contains a NUL byte".into());
        }
        let canonical = std::fs::canonicalize(path).map_err(|e| format!("{path}: {e}"))?;
        if !self.allow_roots.iter().any(|r| canonical.starts_with(r)) {
            return Err(format!(
                "{path} is outside the allowed roots ({}); add its directory to the operator's `allow_roots` option",
                self.allow_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(canonical)
    }

    /// Decodes one row's image into RGB pixels, as `load_image` does.
    pub fn load(&self, input: &ImageInput) -> Result<Pixels, String> {
        match input {
            ImageInput::Bytes { array, row } => {
                let bytes: &[u8] = match array.data_type() {
                    DataType::Binary => array.as_binary::<i32>().value(*row),
                    DataType::LargeBinary => array.as_binary::<i64>().value(*row),
                    DataType::BinaryView => array.as_binary_view().value(*row),
                    DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(*row),
                    other => return Err(format!("cannot read image bytes from {other}")),
                };
                decode(bytes, self.max_pixels)
            }
            ImageInput::Path(p) => {
                let path = self.resolve(p)?;
                let bytes = std::fs::read(&path).map_err(|e| format!("{p}: {e}"))?;
                decode(&bytes, self.max_pixels).map_err(|e| format!("{p}: {e}"))
            }
        }
    }
}

/// Decodes encoded image bytes into RGB pixels with Pillow's conversions and EXIF orientation.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Pixels, String> {
    if bytes.is_empty() {
        return Err("empty image (zero bytes)".into());
    }
    let format = image::guess_format(bytes).map_err(|_| {
        "not an image ferry can decode (JPEG, PNG, WebP, BMP, TIFF or GIF)".to_string()
    })?;
    let orientation = orientation(bytes, format);
    let pixels = match format {
        ImageFormat::Jpeg => jpeg::decode(bytes, max_pixels)?,
        ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff
        | ImageFormat::Gif => decode_other(bytes, format, max_pixels)?,
        other => {
            return Err(format!(
                "{other:?} images are not supported (JPEG, PNG, WebP, BMP, TIFF or GIF)"
            ));
        }
    };
    Ok(orient(pixels, orientation))
}

fn check_size(width: u64, height: u64, max_pixels: u64) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("the image is empty ({width}x{height})"));
    }
    if width.saturating_mul(height) > max_pixels {
        return Err(format!(
            "the image is {width}x{height} ({} pixels), over the limit of {max_pixels} (a decompression bomb?); raise the operator's `max_pixels` option to accept it",
            width * height
        ));
    }
    Ok(())
}

/// The EXIF orientation (1-8), read from the image's metadata; 1 when there is none.
fn orientation(bytes: &[u8], format: ImageFormat) -> u8 {
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let Ok(mut decoder) = reader.into_decoder() else {
        return 1;
    };
    match decoder.orientation() {
        Ok(o) => orientation_number(o),
        Err(_) => 1,
    }
}

fn orientation_number(o: image::metadata::Orientation) -> u8 {
    use image::metadata::Orientation::*;
    match o {
        NoTransforms => 1,
        FlipHorizontal => 2,
        Rotate180 => 3,
        FlipVertical => 4,
        Rotate90FlipH => 5,
        Rotate90 => 6,
        Rotate270FlipH => 7,
        Rotate270 => 8,
    }
}

/// Applies an EXIF orientation as `ImageOps.exif_transpose` does.
fn orient(p: Pixels, orientation: u8) -> Pixels {
    if !(2..=8).contains(&orientation) {
        return p;
    }
    let (w, h, c) = (p.width, p.height, p.channels);
    // 5-8 swap the axes.
    let (ow, oh) = if orientation >= 5 { (h, w) } else { (w, h) };
    let mut out = vec![0u8; p.data.len()];
    for y in 0..oh {
        for x in 0..ow {
            // The source pixel of output (x, y).
            let (sx, sy) = match orientation {
                2 => (w - 1 - x, y),         // FLIP_LEFT_RIGHT
                3 => (w - 1 - x, h - 1 - y), // ROTATE_180
                4 => (x, h - 1 - y),         // FLIP_TOP_BOTTOM
                5 => (y, x),                 // TRANSPOSE
                6 => (y, h - 1 - x),         // ROTATE_270 (clockwise 90)
                7 => (w - 1 - y, h - 1 - x), // TRANSVERSE
                _ => (w - 1 - y, x),         // 8: ROTATE_90 (counter-clockwise)
            };
            let s = (sy * w + sx) * c;
            let d = (y * ow + x) * c;
            out[d..d + c].copy_from_slice(&p.data[s..s + c]);
        }
    }
    Pixels::new(ow, oh, c, out)
}

/// PNG, WebP, BMP, TIFF and GIF (first frame) through the `image` crate, converted to RGB as
/// Pillow converts each mode.
fn decode_other(bytes: &[u8], format: ImageFormat, max_pixels: u64) -> Result<Pixels, String> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // ferry's own pixel limit (checked next, with a clearer message) bounds the allocation.
    reader.no_limits();
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64, max_pixels)?;
    let image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    let (w, h) = (w as usize, h as usize);
    let rgb: Vec<u8> = match image {
        DynamicImage::ImageRgb8(i) => i.into_raw(),
        DynamicImage::ImageRgba8(i) => drop_alpha(i.as_raw(), 4),
        DynamicImage::ImageLuma8(i) => gray(i.as_raw(), 1),
        DynamicImage::ImageLumaA8(i) => gray(i.as_raw(), 2),
        // Pillow opens 16-bit RGB(A) and LA as 8-bit modes keeping each sample's high byte.
        DynamicImage::ImageRgb16(i) => high_bytes(i.as_raw()),
        DynamicImage::ImageRgba16(i) => high_bytes(&drop_alpha(i.as_raw(), 4)),
        DynamicImage::ImageLumaA16(i) => gray(&high_bytes(i.as_raw()), 2),
        // 16-bit grayscale is Pillow's mode "I;16"; its conversion to RGB clips at 255
        // rather than scaling.
        DynamicImage::ImageLuma16(i) => i
            .as_raw()
            .iter()
            .flat_map(|&v| [v.min(255) as u8; 3])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    Ok(Pixels::new(w, h, 3, rgb))
}

fn drop_alpha<T: Copy>(data: &[T], channels: usize) -> Vec<T> {
    data.chunks_exact(channels)
        .flat_map(|px| [px[0], px[1], px[2]])
        .collect()
}

fn high_bytes(data: &[u16]) -> Vec<u8> {
    data.iter().map(|&v| (v >> 8) as u8).collect()
}

fn gray<T: Copy + TryInto<u8>>(data: &[T], channels: usize) -> Vec<u8> {
    data.chunks_exact(channels)
        .flat_map(|px| {
            let v: u8 = px[0].try_into().unwrap_or(u8::MAX);
            [v; 3]
        })
        .collect()
}

/// JPEG through libjpeg-turbo (the `mozjpeg` crate) with Pillow's settings.
mod jpeg {
    use mozjpeg_sys::{J_MESSAGE_CODE, JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr};
    use std::os::raw::c_int;

    use super::{Pixels, check_size};

    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
        std::panic::resume_unwind(Box::new(format!(
            "corrupt JPEG data (libjpeg error {code})"
        )));
    }

    /// Warnings are Pillow's too, except running out of data: Pillow refuses a truncated
    /// file ("image file is truncated"), so ferry does.
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        let code: J_MESSAGE_CODE = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
        if level < 0 && code == JWRN_JPEG_EOF {
            std::panic::resume_unwind(Box::new(
                "the JPEG file is truncated (premature end of data)".to_string(),
            ));
        }
    }

    fn error_manager() -> jpeg_error_mgr {
        // SAFETY: jpeg_std_error fills every field of a zeroed struct, as libjpeg documents.
        let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        err
    }

    pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Pixels, String> {
        let decoded = std::panic::catch_unwind(|| -> Result<Pixels, String> {
            let d = mozjpeg::Decompress::with_err(error_manager())
                .from_mem(bytes)
                .map_err(|e| e.to_string())?;
            let (w, h) = d.size();
            check_size(w as u64, h as u64, max_pixels)?;
            let px = |data: Vec<u8>| Pixels::new(w, h, 3, data);
            Ok(match d.image().map_err(|e| e.to_string())? {
                mozjpeg::Format::RGB(mut s) => {
                    let data: Vec<u8> = s.read_scanlines().map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())?;
                    px(data)
                }
                mozjpeg::Format::Gray(mut s) => {
                    let data: Vec<u8> = s.read_scanlines().map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())?;
                    px(data.iter().flat_map(|&v| [v; 3]).collect())
                }
                mozjpeg::Format::CMYK(mut s) => {
                    let data: Vec<u8> = s.read_scanlines().map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())?;
                    // Pillow reads CMYK JPEGs inverted ("CMYK;I", Adobe's convention), then
                    // converts with cmyk2rgb: nk - c * nk / 255, nk = 255 - k.
                    let rgb = data
                        .chunks_exact(4)
                        .flat_map(|p| {
                            let [c, m, y, k] = [255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]];
                            let nk = 255 - k as i32;
                            let muldiv255 = |a: u8| {
                                let t = a as i32 * nk + 128;
                                ((t >> 8) + t) >> 8
                            };
                            [c, m, y].map(|v| (nk - muldiv255(v)).clamp(0, 255) as u8)
                        })
                        .collect();
                    px(rgb)
                }
            })
        });
        match decoded {
            Ok(r) => r,
            Err(payload) => Err(payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "corrupt JPEG data".to_string())),
        }
    }
}

/// Encodes 8-bit pixels (1 channel: grayscale "L", 3: RGB) as a PNG, compressed for speed
/// (masks and depth maps are mostly flat and stay small).
pub fn encode_png(
    width: usize,
    height: usize,
    channels: usize,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let color = match channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        n => return Err(format!("cannot encode {n}-channel pixels as PNG")),
    };
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(data, width as u32, height as u32, color)
        .map_err(|e| format!("encoding a PNG: {e}"))?;
    Ok(out)
}

/// Whether `path` lies under one of `roots` (both canonical).
pub fn under_roots(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientation_matches_pillow_transposes() {
        // 2x1 image: pixel values 1 and 2 (one channel).
        let p = Pixels::new(2, 1, 1, vec![1, 2]);
        assert_eq!(orient(p.clone(), 2).data, vec![2, 1]);
        assert_eq!(orient(p.clone(), 3).data, vec![2, 1]);
        assert_eq!(orient(p.clone(), 4).data, vec![1, 2]);
        // 6: rotate 90 clockwise, the left pixel ends on top.
        let r = orient(p.clone(), 6);
        assert_eq!((r.width, r.height, r.data), (1, 2, vec![1, 2]));
        // 8: rotate 90 counter-clockwise, the right pixel ends on top.
        let r = orient(p.clone(), 8);
        assert_eq!((r.width, r.height, r.data), (1, 2, vec![2, 1]));
        assert_eq!(orient(p.clone(), 5).data, vec![1, 2]);
        assert_eq!(orient(p, 7).data, vec![2, 1]);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(
            decode(b"", DEFAULT_MAX_PIXELS)
                .unwrap_err()
                .contains("zero bytes")
        );
        assert!(decode(b"hello, I am text", DEFAULT_MAX_PIXELS).is_err());
        // A JPEG start of image and nothing else.
        assert!(decode(&[0xFF, 0xD8, 0xFF], DEFAULT_MAX_PIXELS).is_err());
    }
}
