//! `ferry render`: pictures a person can look at, from operator results beside their images.
//!
//! The result column's type says what to draw: detections (`List<Struct<label, score, box>>`)
//! as boxes with their label and score; segments (`List<Struct<label, score, mask>>`) as
//! coloured overlays with a legend; depth (`Struct<..., depth>`) as a colour map beside the
//! image; labels (`Struct<label, score>` or a list of them) as a caption. Drawing uses
//! `embedded-graphics` (shapes and a bitmap font), colour maps come from `colorous`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StructArray};
use datafusion::arrow::datatypes::{DataType, Float64Type};
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_10X20};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use futures::StreamExt;

use crate::ops::image::resample::{Filter, pil_resize};
use crate::ops::image::{ImageInput, ImageReading, Pixels, encode_png};
use crate::query::{QueryInputs, context_for};

/// Distinct colours for labels (Tableau 10).
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// An RGB picture embedded-graphics draws on.
struct Canvas<'a>(&'a mut Pixels);

impl OriginDimensions for Canvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.0.width as u32, self.0.height as u32)
    }
}

impl DrawTarget for Canvas<'_> {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> Result<(), Self::Error> {
        let (w, h) = (self.0.width as i32, self.0.height as i32);
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && p.x < w && p.y < h {
                let at = (p.y as usize * self.0.width + p.x as usize) * 3;
                self.0.data[at..at + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

fn rgb(c: [u8; 3]) -> Rgb888 {
    Rgb888::new(c[0], c[1], c[2])
}

/// A colour per label name, stable across images.
fn colour(label: &str) -> [u8; 3] {
    let hash = label
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    PALETTE[hash % PALETTE.len()]
}

/// Writes `text` on a filled box at `(x, y)`, kept inside the picture.
fn label(canvas: &mut Canvas<'_>, text: &str, x: i32, y: i32, background: [u8; 3]) {
    let big = canvas.0.width.min(canvas.0.height) >= 400;
    let font = if big { &FONT_10X20 } else { &FONT_6X10 };
    let (cw, ch) = (
        font.character_size.width as i32,
        font.character_size.height as i32,
    );
    let w = cw * text.chars().count() as i32 + 4;
    let x = x.clamp(0, (canvas.0.width as i32 - w).max(0));
    let y = y.clamp(0, (canvas.0.height as i32 - ch - 2).max(0));
    let _ = Rectangle::new(Point::new(x, y), Size::new(w as u32, ch as u32 + 2))
        .into_styled(PrimitiveStyle::with_fill(rgb(background)))
        .draw(canvas);
    let _ = Text::with_baseline(
        text,
        Point::new(x + 2, y + 1),
        MonoTextStyle::new(font, Rgb888::WHITE),
        Baseline::Top,
    )
    .draw(canvas);
}

fn draw_detections(picture: &mut Pixels, items: &StructArray) -> anyhow::Result<()> {
    let boxes = items
        .column_by_name("box")
        .context("detections have no `box`")?
        .as_struct();
    let labels = items
        .column_by_name("label")
        .context("no `label`")?
        .as_string::<i32>();
    let scores = items
        .column_by_name("score")
        .context("no `score`")?
        .as_primitive::<Float64Type>();
    let stroke = (picture.width.min(picture.height) / 200).max(2) as u32;
    let mut canvas = Canvas(picture);
    for i in 0..items.len() {
        let corner = |k: usize| boxes.column(k).as_primitive::<Float64Type>().value(i) as i32;
        let (x0, y0, x1, y1) = (corner(0), corner(1), corner(2), corner(3));
        let c = colour(labels.value(i));
        let _ = Rectangle::with_corners(Point::new(x0, y0), Point::new(x1, y1))
            .into_styled(PrimitiveStyle::with_stroke(rgb(c), stroke))
            .draw(&mut canvas);
        let text = format!("{} {:.2}", labels.value(i), scores.value(i));
        label(&mut canvas, &text, x0, y0 - 22, c);
    }
    Ok(())
}

fn draw_segments(picture: &mut Pixels, items: &StructArray) -> anyhow::Result<()> {
    let labels = items
        .column_by_name("label")
        .context("no `label`")?
        .as_string::<i32>();
    let masks = items
        .column_by_name("mask")
        .context("no `mask`")?
        .as_binary::<i32>();
    for i in 0..items.len() {
        let mask = image::load_from_memory(masks.value(i))
            .context("a mask is not a PNG")?
            .to_luma8();
        if (mask.width() as usize, mask.height() as usize) != (picture.width, picture.height) {
            bail!(
                "a mask is {}x{}, the image {}x{}",
                mask.width(),
                mask.height(),
                picture.width,
                picture.height
            );
        }
        let c = colour(labels.value(i));
        for (m, px) in mask.as_raw().iter().zip(picture.data.chunks_exact_mut(3)) {
            if *m > 127 {
                for k in 0..3 {
                    px[k] = ((px[k] as u16 + c[k] as u16) / 2) as u8;
                }
            }
        }
    }
    let mut canvas = Canvas(picture);
    for i in 0..items.len() {
        label(
            &mut canvas,
            labels.value(i),
            4,
            4 + 24 * i as i32,
            colour(labels.value(i)),
        );
    }
    Ok(())
}

/// The image and its depth map side by side, the map in the Turbo colour map (near = warm).
fn draw_depth(picture: &Pixels, depth: &StructArray, row: usize) -> anyhow::Result<Pixels> {
    let png = depth
        .column_by_name("depth")
        .context("no `depth`")?
        .as_binary::<i32>();
    let map = image::load_from_memory(png.value(row))?.to_luma8();
    let (w, h) = (picture.width, picture.height);
    if (map.width() as usize, map.height() as usize) != (w, h) {
        bail!(
            "the depth map is {}x{}, the image {w}x{h}",
            map.width(),
            map.height()
        );
    }
    let mut out = vec![0u8; w * 2 * h * 3];
    for y in 0..h {
        out[y * w * 6..y * w * 6 + w * 3]
            .copy_from_slice(&picture.data[y * w * 3..(y + 1) * w * 3]);
        for x in 0..w {
            let v = map.get_pixel(x as u32, y as u32)[0];
            let c = colorous::TURBO.eval_continuous(v as f64 / 255.0);
            let at = y * w * 6 + (w + x) * 3;
            out[at..at + 3].copy_from_slice(&[c.r, c.g, c.b]);
        }
    }
    Ok(Pixels::new(w * 2, h, 3, out))
}

fn draw_labels(picture: &mut Pixels, items: &StructArray) {
    let labels = items.column(0).as_string::<i32>();
    let scores = items.column(1).as_primitive::<Float64Type>();
    let mut canvas = Canvas(picture);
    for i in 0..items.len() {
        let text = format!("{} {:.2}", labels.value(i), scores.value(i));
        label(
            &mut canvas,
            &text,
            4,
            4 + 24 * i as i32,
            PALETTE[i % PALETTE.len()],
        );
    }
}

/// What a result column holds.
enum Kind {
    Detections,
    Segments,
    Labels,
    LabelList,
    Depth,
}

fn kind_of(t: &DataType) -> anyhow::Result<Kind> {
    let names = |fields: &datafusion::arrow::datatypes::Fields| -> Vec<String> {
        fields.iter().map(|f| f.name().clone()).collect()
    };
    Ok(match t {
        DataType::List(item) => match item.data_type() {
            DataType::Struct(f) if names(f).contains(&"box".to_string()) => Kind::Detections,
            DataType::Struct(f) if names(f).contains(&"mask".to_string()) => Kind::Segments,
            DataType::Struct(f) if names(f).starts_with(&["label".into(), "score".into()]) => {
                Kind::LabelList
            }
            other => bail!("cannot draw a list of {other}"),
        },
        DataType::Struct(f) if names(f).contains(&"depth".to_string()) => Kind::Depth,
        DataType::Struct(f) if names(f).starts_with(&["label".into(), "score".into()]) => {
            Kind::Labels
        }
        other => bail!("cannot draw a {other} column (detections, segments, depth or labels)"),
    })
}

/// Draws one row's result on its image.
fn render_one(
    picture: Pixels,
    result: &ArrayRef,
    row: usize,
    kind: &Kind,
) -> anyhow::Result<Pixels> {
    let mut picture = picture;
    match kind {
        Kind::Detections | Kind::Segments | Kind::LabelList => {
            let list = result.as_list::<i32>().value(row);
            let items = list.as_struct();
            match kind {
                Kind::Detections => draw_detections(&mut picture, items)?,
                Kind::Segments => draw_segments(&mut picture, items)?,
                _ => draw_labels(&mut picture, items),
            }
            Ok(picture)
        }
        Kind::Labels => {
            let s = result.as_struct().slice(row, 1);
            draw_labels(&mut picture, &s);
            Ok(picture)
        }
        Kind::Depth => draw_depth(&picture, result.as_struct(), row),
    }
}

/// What `ferry render` draws.
pub struct RenderJob<'a> {
    pub sql: &'a str,
    pub inputs: &'a QueryInputs,
    /// The column with the image (bytes or a path).
    pub image: &'a str,
    /// The column with the operator's result.
    pub result: &'a str,
    /// A column naming each picture (default: the row number).
    pub name: Option<&'a str>,
    pub out: &'a Path,
    /// Shrink pictures whose longer side is over this many pixels (thumbnails).
    pub max_size: Option<usize>,
}

/// Renders every row of the query into `out` as PNGs; returns the files written.
pub async fn render(job: &RenderJob<'_>) -> anyhow::Result<Vec<PathBuf>> {
    let query = context_for(job.sql, job.inputs).await?;
    let frame = query.sql(job.sql).await?;
    std::fs::create_dir_all(job.out).with_context(|| format!("creating {}", job.out.display()))?;
    let reading = ImageReading::new(None, &[PathBuf::from("/")]).map_err(anyhow::Error::msg)?;
    let mut stream = frame.execute_stream().await?;
    let mut written = Vec::new();
    let mut index = 0usize;
    while let Some(batch) = stream.next().await {
        let batch: RecordBatch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .with_context(|| format!("the query has no column `{name}`"))
        };
        let images = column(job.image)?;
        let results = column(job.result)?;
        let kind = kind_of(results.data_type())?;
        let names = job.name.map(column).transpose()?;
        let names = names
            .map(|n| datafusion::arrow::compute::cast(&n, &DataType::Utf8))
            .transpose()?;
        for row in 0..batch.num_rows() {
            let file_stem = match &names {
                Some(n) if n.is_valid(row) => sanitize(n.as_string::<i32>().value(row)),
                _ => format!("{index:06}"),
            };
            index += 1;
            if images.is_null(row) || results.is_null(row) {
                tracing::warn!(row = file_stem, "no image or no result; nothing drawn");
                continue;
            }
            let input = match images.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    let path =
                        datafusion::arrow::compute::cast(&images.slice(row, 1), &DataType::Utf8)?;
                    ImageInput::Path(path.as_string::<i32>().value(0).to_string())
                }
                _ => ImageInput::Bytes {
                    array: images.clone(),
                    row,
                },
            };
            let picture = reading.load(&input).map_err(anyhow::Error::msg)?;
            let mut drawn = render_one(picture, &results, row, &kind)
                .with_context(|| format!("row {file_stem}"))?;
            if let Some(max) = job
                .max_size
                .filter(|&m| m > 0 && drawn.width.max(drawn.height) > m)
            {
                let scale = max as f64 / drawn.width.max(drawn.height) as f64;
                let (w, h) = (
                    ((drawn.width as f64 * scale).round() as usize).max(1),
                    ((drawn.height as f64 * scale).round() as usize).max(1),
                );
                drawn = pil_resize(&drawn, w, h, Filter::Bicubic);
            }
            let path = job.out.join(format!("{file_stem}.png"));
            let png = encode_png(drawn.width, drawn.height, 3, &drawn.data)
                .map_err(anyhow::Error::msg)?;
            std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// A file name from a value (paths keep their last component's stem).
fn sanitize(name: &str) -> String {
    let stem = Path::new(name)
        .file_stem()
        .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_and_labels_land_on_the_picture() {
        let mut p = Pixels::new(100, 60, 3, vec![0; 100 * 60 * 3]);
        label(&mut Canvas(&mut p), "cat 0.90", 10, 10, [255, 0, 0]);
        assert!(
            p.data.chunks(3).any(|px| px == [255, 0, 0]),
            "background drawn"
        );
        assert!(
            p.data.chunks(3).any(|px| px == [255, 255, 255]),
            "text drawn"
        );
        assert_eq!(sanitize("photos/a b.jpg"), "a_b");
    }
}
