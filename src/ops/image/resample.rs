//! Resampling that reproduces the libraries `transformers` resizes with, value for value.
//!
//! - [`pil_resize`]: Pillow's `Image.resize` on 8-bit images (its convolution with antialiasing
//!   on downscale, fixed-point coefficients, horizontal pass then vertical pass, each rounded to
//!   8 bits). Image processors resize through Pillow, so `pixel_values` only match when this
//!   matches. fast_image_resize, the crate that fits best, follows Pillow-SIMD's 16-bit
//!   coefficients and differed from Pillow by up to 7 levels on the test images (1-2 typically),
//!   which moves normalized pixels by up to 0.12; hence this port of Pillow's `Resample.c`.
//! - [`torch_interpolate`]: `torch.nn.functional.interpolate` on f32 planes, `bilinear` and
//!   `bicubic` (A = -0.75) with `align_corners=False` and no antialiasing, as post-processing
//!   uses it to bring logits and depth back to the image's size.

/// Pillow's filters, by the `resample` numbers of `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// PIL's enum: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming.
    pub fn from_pil(n: i64) -> Option<Self> {
        Some(match n {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let xp = x * std::f64::consts::PI;
                    xp.sin() / xp * (0.54 + 0.46 * xp.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// An 8-bit interleaved image: `height` rows of `width * channels` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * channels);
        Pixels {
            width,
            height,
            channels,
            data,
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel, how many follow, and fixed-point weights
/// (Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's horizontal pass over rows `first..first + rows` of `src`.
fn horizontal(src: &Pixels, first: usize, rows: usize, c: &Coefficients, out_w: usize) -> Pixels {
    let ch = src.channels;
    let mut out = vec![0u8; out_w * rows * ch];
    let in_stride = src.width * ch;
    for y in 0..rows {
        let line = &src.data[(first + y) * in_stride..(first + y + 1) * in_stride];
        let dst = &mut out[y * out_w * ch..(y + 1) * out_w * ch];
        for xx in 0..out_w {
            let (xmin, n) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let taps = &line[xmin * ch..(xmin + n) * ch];
            let dst = &mut dst[xx * ch..(xx + 1) * ch];
            if ch == 3 {
                // All three channels in one pass over the taps.
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (px, &w) in taps.chunks_exact(3).zip(k) {
                    for (s, &v) in ss.iter_mut().zip(px) {
                        *s = s.wrapping_add(v as i32 * w);
                    }
                }
                for (d, s) in dst.iter_mut().zip(ss) {
                    *d = clip8(s);
                }
            } else {
                for (channel, d) in dst.iter_mut().enumerate() {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (px, &w) in taps.chunks_exact(ch).zip(k) {
                        ss = ss.wrapping_add(px[channel] as i32 * w);
                    }
                    *d = clip8(ss);
                }
            }
        }
    }
    Pixels::new(out_w, rows, ch, out)
}

/// Pillow's vertical pass; `shift` is subtracted from each output row's first input row.
/// Whole rows are accumulated at once (the same sums in the same order as Pillow's
/// per-pixel loop, so the same values), which the compiler vectorizes.
fn vertical(src: &Pixels, c: &Coefficients, shift: usize, out_h: usize) -> Pixels {
    let ch = src.channels;
    let stride = src.width * ch;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        let (ymin, n) = c.bounds[yy];
        let ymin = ymin - shift;
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (y, &w) in k.iter().enumerate() {
            let row = &src.data[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(v as i32 * w);
            }
        }
        for (d, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    Pixels::new(src.width, out_h, ch, out)
}

/// Pillow's nearest-neighbour resize (`ImagingTransform` with an affine map, as `resize`
/// with `NEAREST` does it).
fn nearest(src: &Pixels, width: usize, height: usize) -> Pixels {
    let ch = src.channels;
    let (sx, sy) = (
        src.width as f64 / width as f64,
        src.height as f64 / height as f64,
    );
    let mut out = vec![0u8; width * height * ch];
    for y in 0..height {
        let yin = (((y as f64 + 0.5) * sy) as usize).min(src.height - 1);
        for x in 0..width {
            let xin = (((x as f64 + 0.5) * sx) as usize).min(src.width - 1);
            let s = (yin * src.width + xin) * ch;
            out[(y * width + x) * ch..(y * width + x + 1) * ch]
                .copy_from_slice(&src.data[s..s + ch]);
        }
    }
    Pixels::new(width, height, ch, out)
}

/// `PIL.Image.resize((width, height), resample)` of an 8-bit image.
pub fn pil_resize(src: &Pixels, width: usize, height: usize, filter: Filter) -> Pixels {
    if (width, height) == (src.width, src.height) || src.width == 0 || src.height == 0 {
        return src.clone();
    }
    if filter == Filter::Nearest {
        return nearest(src, width, height);
    }
    let need_h = width != src.width;
    let need_v = height != src.height;
    let ch = coefficients(src.width, width, filter);
    let cv = coefficients(src.height, height, filter);
    // Only the input rows the vertical pass reads go through the horizontal pass.
    let first = cv.bounds[0].0;
    let last = cv.bounds[height - 1].0 + cv.bounds[height - 1].1;
    let mut image;
    let shift;
    if need_h {
        image = horizontal(src, first, last - first, &ch, width);
        shift = first;
    } else {
        image = src.clone();
        shift = 0;
    }
    if need_v {
        image = vertical(&image, &cv, shift, height);
    }
    image
}

/// OpenCV's `cv2.resize(..., interpolation=INTER_LINEAR)` of an 8-bit image, as YOLO
/// pipelines (Ultralytics' letterbox, NudeNet's `blobFromImage`) resize: bilinear from the two
/// nearest pixels with no antialiasing, weights in 11-bit fixed point, rows combined with 22-bit
/// rounding. OpenCV's vectorized row pass rounds in two steps where its scalar tail rounds in
/// one, so its output can differ from this by one level on some pixels.
pub fn opencv_linear(src: &Pixels, width: usize, height: usize) -> Pixels {
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    opencv_linear_padded(src, (src.width, src.height), 0, width, height)
}

/// [`opencv_linear`] of a `canvas` (width, height) filled with `fill` that holds `src` at its
/// top left, without making the canvas: what NudeNet resizes after padding to a square.
pub fn opencv_linear_padded(
    src: &Pixels,
    canvas: (usize, usize),
    fill: u8,
    width: usize,
    height: usize,
) -> Pixels {
    const BITS: u32 = 11;
    const ONE: f32 = (1 << BITS) as f32;
    let ch = src.channels;
    let (canvas_w, canvas_h) = canvas;
    debug_assert!(canvas_w >= src.width && canvas_h >= src.height);
    // Source index and the two weights of each output coordinate.
    let taps = |dst: usize, in_size: usize, out_size: usize| -> (usize, usize, i32, i32) {
        let scale = in_size as f64 / out_size as f64;
        let f = ((dst as f64 + 0.5) * scale - 0.5) as f32;
        let mut s = f.floor() as i64;
        let mut frac = f - s as f32;
        if s < 0 {
            s = 0;
            frac = 0.0;
        }
        if s >= in_size as i64 - 1 {
            s = in_size as i64 - 1;
            frac = 0.0;
        }
        let a0 = ((1.0 - frac) * ONE).round_ties_even() as i32;
        let s = s as usize;
        (s, (s + 1).min(in_size - 1), a0, (1 << BITS) - a0)
    };
    let xs: Vec<_> = (0..width).map(|x| taps(x, canvas_w, width)).collect();
    let inner = xs.iter().take_while(|t| t.1 < src.width).count();
    // One canvas row resized horizontally (weights sum to 1 << BITS).
    let row = |y: usize, out: &mut [i32]| {
        if y >= src.height {
            out.fill(fill as i32 * (1 << BITS));
            return;
        }
        let line = &src.data[y * src.width * ch..(y + 1) * src.width * ch];
        // Taps inside the image first (no fill to consider), then those reaching the padding.
        let (inside, outside) = xs.split_at(inner);
        let (out_in, out_pad) = out.split_at_mut(inner * ch);
        for (o, &(x0, x1, a0, a1)) in out_in.chunks_exact_mut(ch).zip(inside) {
            let (p0, p1) = (&line[x0 * ch..][..ch], &line[x1 * ch..][..ch]);
            for ((o, &v0), &v1) in o.iter_mut().zip(p0).zip(p1) {
                *o = v0 as i32 * a0 + v1 as i32 * a1;
            }
        }
        let at = |x: usize, c: usize| {
            if x < src.width {
                line[x * ch + c] as i32
            } else {
                fill as i32
            }
        };
        for (o, &(x0, x1, a0, a1)) in out_pad.chunks_exact_mut(ch).zip(outside) {
            for (c, o) in o.iter_mut().enumerate() {
                *o = at(x0, c) * a0 + at(x1, c) * a1;
            }
        }
    };
    let mut data = vec![0u8; width * height * ch];
    let mut rows = [vec![0i32; width * ch], vec![0i32; width * ch]];
    let mut held = [usize::MAX; 2];
    for (y, out) in data.chunks_exact_mut(width * ch).enumerate() {
        let (y0, y1, b0, b1) = taps(y, canvas_h, height);
        // The previous output row's second source row is often this one's first.
        if held[0] != y0 {
            if held[1] == y0 {
                rows.swap(0, 1);
                held.swap(0, 1);
            } else {
                row(y0, &mut rows[0]);
                held[0] = y0;
            }
        }
        if held[1] != y1 {
            row(y1, &mut rows[1]);
            held[1] = y1;
        }
        for ((o, &a), &b) in out.iter_mut().zip(&rows[0]).zip(&rows[1]) {
            let v = (a * b0 + b * b1 + (1 << (2 * BITS - 1))) >> (2 * BITS);
            *o = v.clamp(0, 255) as u8;
        }
    }
    Pixels::new(width, height, ch, data)
}

/// How [`torch_interpolate`] interpolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// The two source pixels and their weights for output coordinate `dst` of torch's linear
/// interpolation with `align_corners=False` (`area_pixel_compute_source_index`, clamped at 0).
pub fn linear_taps(dst: usize, scale: f32, size: usize) -> (usize, usize, f32, f32) {
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(size - 1);
    let i1 = if i0 < size - 1 { i0 + 1 } else { i0 };
    let l1 = (src - i0 as f32).clamp(0.0, 1.0);
    (i0, i1, 1.0 - l1, l1)
}

/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode, align_corners=False)` of
/// `planes` f32 planes of `in_h x in_w`, computed as PyTorch's CPU kernels do (f32 weights;
/// bicubic with A = -0.75 and clamped borders).
pub fn torch_interpolate(
    data: &[f32],
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    mode: Interpolation,
) -> Vec<f32> {
    let mut out = vec![0f32; planes * out_h * out_w];
    // area_pixel_compute_scale with align_corners=False and no explicit scale factor.
    let scale_h = in_h as f32 / out_h as f32;
    let scale_w = in_w as f32 / out_w as f32;
    match mode {
        Interpolation::Bilinear => {
            // area_pixel_compute_source_index: max(scale * (dst + 0.5) - 0.5, 0) for linear.
            let ys: Vec<_> = (0..out_h).map(|y| linear_taps(y, scale_h, in_h)).collect();
            let xs: Vec<_> = (0..out_w).map(|x| linear_taps(x, scale_w, in_w)).collect();
            for p in 0..planes {
                let src = &data[p * in_h * in_w..(p + 1) * in_h * in_w];
                let dst = &mut out[p * out_h * out_w..(p + 1) * out_h * out_w];
                for (y, &(y0, y1, h0, h1)) in ys.iter().enumerate() {
                    for (x, &(x0, x1, w0, w1)) in xs.iter().enumerate() {
                        dst[y * out_w + x] = h0
                            * (w0 * src[y0 * in_w + x0] + w1 * src[y0 * in_w + x1])
                            + h1 * (w0 * src[y1 * in_w + x0] + w1 * src[y1 * in_w + x1]);
                    }
                }
            }
        }
        Interpolation::Bicubic => {
            const A: f32 = -0.75;
            let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
            let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
            // Source index without the clamp at 0 for cubic; floor, then taps at -1..=2.
            let taps = |dst: usize, scale: f32, size: usize| -> ([usize; 4], [f32; 4]) {
                let src = scale * (dst as f32 + 0.5) - 0.5;
                let i = src.floor();
                let t = src - i;
                let i = i as i64;
                let at = |k: i64| (i + k).clamp(0, size as i64 - 1) as usize;
                (
                    [at(-1), at(0), at(1), at(2)],
                    [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)],
                )
            };
            let ys: Vec<_> = (0..out_h).map(|y| taps(y, scale_h, in_h)).collect();
            let xs: Vec<_> = (0..out_w).map(|x| taps(x, scale_w, in_w)).collect();
            for p in 0..planes {
                let src = &data[p * in_h * in_w..(p + 1) * in_h * in_w];
                let dst = &mut out[p * out_h * out_w..(p + 1) * out_h * out_w];
                for (y, (yi, yw)) in ys.iter().enumerate() {
                    for (x, (xi, xw)) in xs.iter().enumerate() {
                        let mut rows = [0f32; 4];
                        for (r, &yy) in rows.iter_mut().zip(yi) {
                            let line = &src[yy * in_w..];
                            *r = line[xi[0]] * xw[0]
                                + line[xi[1]] * xw[1]
                                + line[xi[2]] * xw[2]
                                + line[xi[3]] * xw[3];
                        }
                        dst[y * out_w + x] =
                            rows[0] * yw[0] + rows[1] * yw[1] + rows[2] * yw[2] + rows[3] * yw[3];
                    }
                }
            }
        }
    }
    out
}

/// The per-pixel argmax over `planes` of their bilinear upsampling to `out_h x out_w` (as
/// `interpolate(..., mode="bilinear", align_corners=False).argmax(0)`), without holding the
/// upsampled planes: one label per output pixel. Ties go to the first plane, as torch's argmax.
pub fn bilinear_argmax(
    data: &[f32],
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<u16> {
    let scale_h = in_h as f32 / out_h as f32;
    let scale_w = in_w as f32 / out_w as f32;
    let xs: Vec<_> = (0..out_w).map(|x| linear_taps(x, scale_w, in_w)).collect();
    let plane = in_h * in_w;
    let mut out = vec![0u16; out_h * out_w];
    for y in 0..out_h {
        let (y0, y1, h0, h1) = linear_taps(y, scale_h, in_h);
        for (x, &(x0, x1, w0, w1)) in xs.iter().enumerate() {
            let mut best = (0u16, f32::NEG_INFINITY);
            for p in 0..planes {
                let src = &data[p * plane..(p + 1) * plane];
                let v = h0 * (w0 * src[y0 * in_w + x0] + w1 * src[y0 * in_w + x1])
                    + h1 * (w0 * src[y1 * in_w + x0] + w1 * src[y1 * in_w + x1]);
                if v > best.1 {
                    best = (p as u16, v);
                }
            }
            out[y * out_w + x] = best.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let src = Pixels::new(5, 3, 3, vec![77; 45]);
        assert_eq!(pil_resize(&src, 5, 3, Filter::Bilinear), src);
        for filter in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
        ] {
            let up = pil_resize(&src, 17, 11, filter);
            assert!(up.data.iter().all(|&v| v == 77), "{filter:?} up");
            let down = pil_resize(&up, 2, 1, filter);
            assert!(down.data.iter().all(|&v| v == 77), "{filter:?} down");
        }
    }

    #[test]
    fn resizing_a_virtual_canvas_equals_resizing_the_padded_image() {
        // A 7x4 gradient at the top left of a 9x9 canvas of grey 114, resized both ways.
        let data: Vec<u8> = (0..7 * 4 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let src = Pixels::new(7, 4, 3, data);
        let mut canvas = vec![114u8; 9 * 9 * 3];
        for y in 0..4 {
            canvas[y * 27..y * 27 + 21].copy_from_slice(&src.data[y * 21..(y + 1) * 21]);
        }
        let canvas = Pixels::new(9, 9, 3, canvas);
        for (w, h) in [(4, 4), (5, 3), (13, 13), (9, 2), (1, 1)] {
            assert_eq!(
                opencv_linear_padded(&src, (9, 9), 114, w, h),
                opencv_linear(&canvas, w, h),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn argmax_of_upsampled_planes_needs_no_planes() {
        // Two 1x2 planes: plane 1 wins on the right half after upsampling to 1x4.
        let data = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(bilinear_argmax(&data, 2, 1, 2, 1, 4), vec![0, 0, 1, 1]);
        let up = torch_interpolate(&data, 2, 1, 2, 1, 4, Interpolation::Bilinear);
        assert_eq!(up, vec![1.0, 0.75, 0.25, 0.0, 0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn torch_bilinear_upsamples_a_ramp_like_torch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.]]]]), size=(1, 4),
        // mode="bilinear", align_corners=False) == [0, 0.25, 0.75, 1].
        let out = torch_interpolate(&[0.0, 1.0], 1, 1, 2, 1, 4, Interpolation::Bilinear);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
