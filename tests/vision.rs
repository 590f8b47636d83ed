//! Image operators against `transformers`' image processors and pipelines, as recorded by
//! tests/fixtures/vision.py on the scikit-image samples and hard images.

use std::sync::Arc;

use ferry::datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, RecordBatch, StringArray, StructArray,
};
use ferry::datafusion::arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Schema};
use ferry::datafusion::datasource::MemTable;
use ferry::datafusion::prelude::SessionContext;
use ferry::runtime::tensor::Data;

use crate::util::*;

pub fn image_path(name: &str) -> std::path::PathBuf {
    root().join("tests/fixtures/images").join(name)
}

/// Registers `imgs(name Utf8, bytes Binary, path Utf8)` with the golden file's images.
pub fn register_images(ctx: &SessionContext, names: &[String]) {
    register_files(ctx, "imgs", "tests/fixtures/images", names);
}

fn golden_images(g: &serde_json::Value) -> Vec<String> {
    g["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap().to_string())
        .collect()
}

/// One row per golden image, in golden order, of `SELECT op(arg) FROM imgs`.
async fn run(op: &str, arg: &str, g: &serde_json::Value) -> (Vec<RecordBatch>, Vec<String>) {
    let names = golden_images(g);
    let (ctx, _ops) = context_with(&[op]);
    register_images(&ctx, &names);
    let batches = sql(&ctx, &format!("SELECT name, {op}({arg}) AS out FROM imgs")).await;
    let order: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let n = b.column(0).as_string::<i32>();
            (0..n.len())
                .map(|i| n.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(order, names, "rows come back in input order");
    (batches, names)
}

/// The `out` column's rows.
fn rows(batches: &[RecordBatch]) -> Vec<ArrayRef> {
    batches.iter().map(|b| b.column(1).clone()).collect()
}

/// (label, score) of each list item of row `i`.
fn labels_scores(list: &ArrayRef, i: usize) -> Vec<(String, f64)> {
    let l = list.as_list::<i32>().value(i);
    let s = l.as_struct();
    (0..s.len())
        .map(|j| {
            (
                s.column(0).as_string::<i32>().value(j).to_string(),
                s.column(1).as_primitive::<Float64Type>().value(j),
            )
        })
        .collect()
}

#[track_caller]
fn assert_ranked(got: &[(String, f64)], want: &serde_json::Value, what: &str) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w["label"].as_str().unwrap(), "{what}: label");
        let ws = w["score"].as_f64().unwrap();
        assert!((g.1 - ws).abs() <= 1e-4, "{what}: score {} vs {ws}", g.1);
    }
}

/// What the processor made of an image.
enum Pixels {
    /// Not recorded (the huge image, for the processors that keep its full size).
    Unknown,
    /// The processor refuses the image.
    Refused,
    /// The shape and the pixel_values: the golden uint8 picture through rescale and normalize.
    Values(Vec<usize>, Vec<f32>),
}

fn golden_pixels(model: &str, image: &str) -> Pixels {
    let dir = root().join("tests/fixtures/golden/pixels").join(model);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pixels.json")).unwrap()).unwrap();
    let entry = &index[image];
    if entry.is_null() {
        return Pixels::Unknown;
    }
    if entry.get("error").is_some() {
        return Pixels::Refused;
    }
    let shape: Vec<usize> = entry["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let png = dir.join(format!("{image}.png"));
    let levels = image::open(&png).unwrap().to_rgb8();
    let scale = entry["rescale_factor"].as_f64().unwrap();
    let mean = floats(&entry["mean"]);
    let std = floats(&entry["std"]);
    let (h, w) = (shape[1], shape[2]);
    let mut out = vec![0f32; 3 * h * w];
    for (x, y, p) in levels.enumerate_pixels() {
        for c in 0..3 {
            let v = (p[c] as f64 * scale) as f32;
            out[(c * h + y as usize) * w + x as usize] = (v - mean[c] as f32) / std[c] as f32;
        }
    }
    Pixels::Values(shape, out)
}

/// Every processor's pixel_values equal transformers' on every test image (within 1e-4), and
/// images the processor refuses are refused.
#[tokio::test]
async fn pixel_values_match_the_image_processors() {
    let ops = [
        ("tiny_vit", "tiny-vit"),
        ("tiny_convnext", "tiny-convnext"),
        ("tiny_detr", "tiny-detr"),
        ("tiny_segformer", "tiny-segformer"),
        ("tiny_glpn", "tiny-glpn"),
        ("tiny_dpt", "tiny-dpt"),
    ];
    let names = golden_images(&golden("tiny-vit"));
    let (_ctx, mut set) = context_with(&[]);
    let mut failures = Vec::new();
    for (op, model) in ops {
        let op = set.get(op).unwrap().clone();
        for name in &names {
            let bytes: ArrayRef = Arc::new(BinaryArray::from_iter_values([std::fs::read(
                image_path(name),
            )
            .unwrap()]));
            let calls = op.baseline.prepare_calls(&[bytes]).unwrap();
            let (shape, want) = match golden_pixels(model, name) {
                Pixels::Unknown => continue,
                Pixels::Refused => {
                    assert!(
                        calls.is_empty(),
                        "{model} {name}: transformers refuses this image"
                    );
                    continue;
                }
                Pixels::Values(shape, want) => (shape, want),
            };
            assert_eq!(calls.len(), 1, "{model} {name}");
            let pv = &calls[0][0];
            assert_eq!(
                pv.shape,
                [1, shape[0] as i64, shape[1] as i64, shape[2] as i64],
                "{model} {name}: shape"
            );
            let Data::F32(got) = &pv.data else {
                panic!("f32 pixels")
            };
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let off = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| (*a - *b).abs() > 1e-4)
                .count();
            if diff > 1e-4 {
                failures.push(format!(
                    "{model} {name}: max diff {diff}, {off} of {} values off",
                    got.len()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn classify_image_matches_the_pipeline() {
    for (op, model) in [("tiny_vit", "tiny-vit"), ("tiny_convnext", "tiny-convnext")] {
        let g = golden(model);
        let (batches, names) = run(op, "bytes", &g).await;
        let mut i = 0;
        for col in rows(&batches) {
            for r in 0..col.len() {
                let got = labels_scores(&col, r);
                assert_ranked(&got, &g["rows"][i]["all"], &format!("{op} {}", names[i]));
                i += 1;
            }
        }
    }
}

#[tokio::test]
async fn classify_image_reads_paths_and_gives_the_best_label_by_default() {
    let g = golden("tiny-vit");
    let (batches, names) = run("tiny_vit_best", "path", &g).await;
    let mut i = 0;
    for col in rows(&batches) {
        let s = col.as_struct();
        for r in 0..s.len() {
            let best = &g["rows"][i]["all"][0];
            assert_eq!(
                s.column(0).as_string::<i32>().value(r),
                best["label"].as_str().unwrap(),
                "{}",
                names[i]
            );
            let score = s.column(1).as_primitive::<Float64Type>().value(r);
            assert!((score - best["score"].as_f64().unwrap()).abs() <= 1e-4);
            i += 1;
        }
    }
}

/// (label, score, [xmin, ymin, xmax, ymax]) of each detection in row `i`.
fn detections(list: &ArrayRef, i: usize) -> Vec<(String, f64, [f64; 4])> {
    let l = list.as_list::<i32>().value(i);
    let s = l.as_struct();
    let boxes: &StructArray = s.column(2).as_struct();
    (0..s.len())
        .map(|j| {
            let corner = |k: usize| boxes.column(k).as_primitive::<Float64Type>().value(j);
            (
                s.column(0).as_string::<i32>().value(j).to_string(),
                s.column(1).as_primitive::<Float64Type>().value(j),
                [corner(0), corner(1), corner(2), corner(3)],
            )
        })
        .collect()
}

#[tokio::test]
async fn detect_matches_the_pipeline_detr() {
    let g = golden("tiny-detr");
    for (op, key) in [("tiny_detr", "default"), ("tiny_detr_low", "low")] {
        let (batches, names) = run(op, "bytes", &g).await;
        let mut i = 0;
        for col in rows(&batches) {
            for r in 0..col.len() {
                let row = &g["rows"][i];
                let what = format!("{op} {}", names[i]);
                let got = detections(&col, r);
                let want = row[key].as_array().unwrap();
                let want_boxes = row[format!("{key}_boxes")].as_array().unwrap();
                assert_eq!(got.len(), want.len(), "{what}: detections");
                for ((label, score, bx), (w, wb)) in got.iter().zip(want.iter().zip(want_boxes)) {
                    assert_eq!(label, w["label"].as_str().unwrap(), "{what}");
                    assert!(
                        (score - w["score"].as_f64().unwrap()).abs() <= 1e-4,
                        "{what}: score"
                    );
                    let wb = floats(wb);
                    for k in 0..4 {
                        assert!(
                            (bx[k] - wb[k]).abs() <= 1e-3,
                            "{what}: box {bx:?} vs {wb:?}"
                        );
                    }
                    // The pipeline's integer boxes are the float boxes truncated.
                    if let Some(ib) = w["box"].as_object() {
                        let ints = [&ib["xmin"], &ib["ymin"], &ib["xmax"], &ib["ymax"]]
                            .map(|v| v.as_i64().unwrap());
                        assert_eq!(bx.map(|v| v as i64), ints, "{what}: integer box");
                    }
                }
                i += 1;
            }
        }
    }
}

#[tokio::test]
async fn segment_matches_the_pipeline_masks() {
    let g = golden("tiny-segformer");
    let (batches, names) = run("tiny_segformer", "bytes", &g).await;
    let labels: Vec<String> = {
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root().join("tests/fixtures/models/tiny-segformer/config.json"))
                .unwrap(),
        )
        .unwrap();
        (0..cfg["id2label"].as_object().unwrap().len())
            .map(|i| cfg["id2label"][i.to_string()].as_str().unwrap().to_string())
            .collect()
    };
    let mut i = 0;
    for col in rows(&batches) {
        for r in 0..col.len() {
            let row = &g["rows"][i];
            let what = names[i].clone();
            i += 1;
            let list = col.as_list::<i32>().value(r);
            let s = list.as_struct();
            let got_labels: Vec<&str> = (0..s.len())
                .map(|j| s.column(0).as_string::<i32>().value(j))
                .collect();
            let want_labels: Vec<&str> = row["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(got_labels, want_labels, "{what}");
            assert!(s.column(1).is_null(0), "semantic segments have no score");
            let map = image::open(
                root()
                    .join("tests/fixtures/golden/segments/tiny-segformer")
                    .join(row["label_map"].as_str().unwrap()),
            )
            .unwrap()
            .to_luma8();
            for (j, label) in got_labels.iter().enumerate() {
                let mask = image::load_from_memory(s.column(2).as_binary::<i32>().value(j))
                    .unwrap()
                    .to_luma8();
                assert_eq!(mask.dimensions(), map.dimensions(), "{what}: mask size");
                let id = labels.iter().position(|l| l == label).unwrap() as u8;
                // Where transformers' two best logits are within 1e-4 (class boundaries),
                // float noise between runtimes may pick either label.
                let ambiguous: std::collections::HashSet<(u32, u32)> = row["ambiguous"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[1].as_u64().unwrap() as u32, p[0].as_u64().unwrap() as u32))
                    .collect();
                let differ = mask
                    .enumerate_pixels()
                    .zip(map.pixels())
                    .filter(|((x, y, m), l)| {
                        (m[0] == 255) != (l[0] == id) && !ambiguous.contains(&(*x, *y))
                    })
                    .count();
                assert_eq!(
                    differ, 0,
                    "{what}: mask of {label} differs in {differ} pixels"
                );
            }
        }
    }
}

#[tokio::test]
async fn estimate_depth_matches_the_pipeline() {
    for (op, model) in [("tiny_glpn", "tiny-glpn"), ("tiny_dpt", "tiny-dpt")] {
        let g = golden(model);
        let (batches, names) = run(op, "bytes", &g).await;
        let mut i = 0;
        for col in rows(&batches) {
            let s = col.as_struct();
            for r in 0..s.len() {
                let row = &g["rows"][i];
                let what = format!("{op} {}", names[i]);
                i += 1;
                if row.get("error").is_some() {
                    assert!(s.is_null(r), "{what}: transformers fails on this image");
                    continue;
                }
                let shape = floats(&row["shape"]);
                let (h, w) = (shape[0] as usize, shape[1] as usize);
                let width = s
                    .column(1)
                    .as_primitive::<ferry::datafusion::arrow::datatypes::Int32Type>()
                    .value(r);
                let height = s
                    .column(2)
                    .as_primitive::<ferry::datafusion::arrow::datatypes::Int32Type>()
                    .value(r);
                assert_eq!((height as usize, width as usize), (h, w), "{what}: size");
                let values = s.column(0).as_list::<i32>().value(r);
                let values = values.as_primitive::<Float32Type>().values();
                assert_eq!(values.len(), h * w);
                let step = row["step"].as_u64().unwrap() as usize;
                let want = floats(&row["sample"]);
                let mut k = 0;
                let mut max_diff = 0f64;
                for y in (0..h).step_by(step) {
                    for x in (0..w).step_by(step) {
                        max_diff = max_diff.max((values[y * w + x] as f64 - want[k]).abs());
                        k += 1;
                    }
                }
                assert_eq!(k, want.len());
                assert!(max_diff <= 1e-4, "{what}: depth max diff {max_diff}");
                let picture = image::load_from_memory(s.column(3).as_binary::<i32>().value(r))
                    .unwrap()
                    .to_luma8();
                let want = floats(&row["depth_sample"]);
                // The picture truncates (d - min) / (max - min) * 255: where that lands within
                // the depth noise of a whole level, the two runtimes may truncate to neighbours.
                let (min, max) = values
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let mut k = 0;
                for y in (0..h).step_by(step) {
                    for x in (0..w).step_by(step) {
                        let got = picture.get_pixel(x as u32, y as u32)[0] as f64;
                        if got != want[k] {
                            let level = ((values[y * w + x] - min) / (max - min) * 255.0) as f64;
                            // Depth noise between runtimes, in levels.
                            let noise = 255.0 * 2.0 * max_diff.max(1e-6) / (max - min) as f64;
                            let near = (level - level.round()).abs() < noise;
                            assert!(
                                near && (got - want[k]).abs() <= 1.0,
                                "{what}: depth picture at {x},{y}: {got} vs {}",
                                want[k]
                            );
                        }
                        k += 1;
                    }
                }
            }
        }
    }
}

/// A PNG that declares `width x height` pixels and holds a few bytes of pixel data: what a
/// decompression bomb looks like before it is inflated.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    fn crc(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&body);
        png.extend(crc(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    // A zlib stream with one stored block of 10 zero bytes (Adler-32 of ten zeros: 0x000a0001).
    let mut idat = vec![0x78, 0x01, 0x01, 10, 0, 0xF5, 0xFF];
    idat.extend([0u8; 10]);
    idat.extend([0x00, 0x0A, 0x00, 0x01]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Every kind of bad image is a row error with its reason; good rows around them flow.
#[tokio::test]
async fn bad_images_fail_their_rows_and_the_rest_flows() {
    let good = std::fs::read(image_path("chelsea.png")).unwrap();
    let rocket = std::fs::read(image_path("rocket.jpg")).unwrap();
    let mut corrupt = good[..64].to_vec();
    corrupt.extend(std::iter::repeat_n(0x5A, 500));
    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("good", Some(good.clone())),
        ("corrupt", Some(corrupt)),
        ("truncated", Some(rocket[..rocket.len() / 2].to_vec())),
        ("empty", Some(vec![])),
        (
            "text",
            Some(b"this is a text file named photo.jpg".to_vec()),
        ),
        ("bomb", Some(png_bomb(50_000, 50_000))),
        (
            "ico",
            Some(vec![0, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0]),
        ),
        ("null", None),
        ("good again", Some(good)),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("bytes", DataType::Binary, true),
    ]));
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let bytes: Vec<Option<&[u8]>> = cases.iter().map(|c| c.1.as_deref()).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(names.clone())),
            Arc::new(BinaryArray::from(bytes)),
        ],
    )
    .unwrap();
    let (ctx, ops) = context_with(&["tiny_vit_best"]);
    ctx.register_table(
        "bad",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let out = sql(&ctx, "SELECT tiny_vit_best(bytes) FROM bad").await;
    let s = out[0].column(0).as_struct();
    for (i, name) in names.iter().enumerate() {
        assert_eq!(s.is_null(i), !name.starts_with("good"), "{name}");
    }
    assert_eq!(
        ops.built().next().unwrap().row_errors(),
        6,
        "null is no error; six bad rows"
    );

    // The reasons, as the decoder gives them.
    let reading = ferry::ops::image::ImageReading::new(None, &[]).unwrap();
    let decode = |b: &[u8]| ferry::ops::image::decode(b, ferry::ops::image::DEFAULT_MAX_PIXELS);
    assert!(
        decode(&cases[2].1.clone().unwrap())
            .unwrap_err()
            .contains("truncated")
    );
    assert!(decode(b"").unwrap_err().contains("zero bytes"));
    let bomb = decode(&cases[5].1.clone().unwrap()).unwrap_err();
    assert!(bomb.contains("decompression bomb"), "{bomb}");
    assert!(
        decode(&cases[6].1.clone().unwrap())
            .unwrap_err()
            .contains("not supported")
    );
    let path = |p: &str| ferry::ops::image::ImageInput::Path(p.to_string());
    assert!(
        reading
            .load(&path("tests/fixtures/images/nope.jpg"))
            .unwrap_err()
            .contains("No such file")
    );
    let outside = reading.load(&path("/etc/hostname")).unwrap_err();
    assert!(outside.contains("outside the allowed roots"), "{outside}");
}

#[tokio::test]
async fn image_operators_check_their_arguments_at_plan_time() {
    let (ctx, _ops) = context_with(&["tiny_detr"]);
    register_texts(&ctx, &[Some("a")]);
    let err = sql_err(&ctx, "SELECT tiny_detr(id) FROM t").await;
    assert!(
        err.contains(
            "tiny_detr (detect) expects Binary image bytes or a path string; argument 1 is Int64"
        ),
        "{err}"
    );
}

/// The files source lists a folder as rows and feeds an image operator, in a pipeline and as
/// `files()` in SQL; without `bytes` nothing is read.
#[tokio::test]
async fn files_source_feeds_image_operators() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("more")).unwrap();
    for name in ["chelsea.png", "rocket.jpg", "coffee.png"] {
        std::fs::copy(image_path(name), photos.join(name)).unwrap();
    }
    std::fs::copy(
        image_path("astronaut.png"),
        photos.join("more/astronaut.png"),
    )
    .unwrap();
    std::fs::write(photos.join("notes.txt"), "not an image").unwrap();
    let out = dir.path().join("out.parquet");
    let yaml = format!(
        "name: photos\nsource:\n  files:\n    path: {}/**/*\nsteps:\n  - operator: tiny_vit_best\n    inputs: [bytes]\n    output: label\n  - sql: SELECT path, size, label['label'] AS label, error FROM input\nsink:\n  parquet:\n    path: {}\n",
        photos.display(),
        out.display()
    );
    let file = crate::pipeline::write_pipeline(dir.path(), &yaml);
    let summary = ferry::engine::run_file(&file, &fixture_operators(), true)
        .await
        .unwrap();
    assert_eq!(summary.rows, 5, "every file is a row");
    assert_eq!(summary.row_errors, 1, "the text file is the one row error");

    let ctx = SessionContext::new();
    ferry::source::register_file(&ctx, "out", out.to_str().unwrap())
        .await
        .unwrap();
    let rows = sql(
        &ctx,
        "SELECT arrow_cast(path, 'Utf8'), arrow_cast(label, 'Utf8') FROM out ORDER BY path",
    )
    .await;
    let paths = rows[0].column(0).as_string::<i32>();
    let labels = rows[0].column(1).as_string::<i32>();
    let want = golden("tiny-vit");
    let best = |image: &str| {
        want["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["image"] == image)
            .unwrap()["all"][0]["label"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for i in 0..paths.len() {
        let name = std::path::Path::new(paths.value(i))
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        if name == "notes.txt" {
            assert!(labels.is_null(i));
        } else {
            assert_eq!(labels.value(i), best(name), "{name}");
        }
    }

    // files() in SQL; projecting no bytes reads no file (an unreadable file has no error then).
    let (ctx, _ops) = context_with(&["tiny_vit_best"]);
    let glob = format!("{}/*.png", photos.display());
    let q = format!("SELECT count(*) AS n, sum(size) AS bytes FROM files('{glob}')");
    let r = sql(&ctx, &q).await;
    assert_eq!(
        r[0].column(0)
            .as_primitive::<ferry::datafusion::arrow::datatypes::Int64Type>()
            .value(0),
        2
    );
    let q = format!(
        "SELECT path, tiny_vit_best(bytes)['label'] AS label FROM files('{glob}') ORDER BY path"
    );
    let r = sql(&ctx, &q).await;
    assert_eq!(
        r[0].column(1).as_string::<i32>().value(0),
        best("chelsea.png")
    );
}

/// A symbolic link out of the source's folder keeps its row, with the reason and no bytes.
#[tokio::test]
async fn files_source_refuses_links_outside_its_roots() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::copy(image_path("chelsea.png"), photos.join("cat.png")).unwrap();
    std::fs::write(dir.path().join("secret.png"), b"outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.png"), photos.join("link.png")).unwrap();
    let ctx = ferry::engine::session_context();
    let q = format!(
        "SELECT path, bytes IS NULL AS missing, error FROM files('{}/*.png') ORDER BY path",
        photos.display()
    );
    let r = sql(&ctx, &q).await;
    let missing = r[0].column(1).as_boolean();
    let error = r[0].column(2).as_string::<i32>();
    assert!(!missing.value(0) && error.is_null(0), "cat.png is read");
    assert!(missing.value(1), "link.png is not read");
    assert!(
        error.value(1).contains("outside the allowed roots"),
        "{}",
        error.value(1)
    );
}

/// The real YOLOv8n (NudeNet) with the package's own settings (operators/nudenet.yaml) finds
/// what the package's own detector finds: same labels, boxes within 2 px, scores within 0.02.
/// The resize differs (Pillow's antialiased bilinear here, OpenCV's bilinear there), so a
/// detection scoring within 0.02 of the threshold may be found by one and not the other.
#[tokio::test]
async fn real_yolov8n_matches_the_packages_own_detector() {
    let models = root().join("models");
    ferry::fetch::fetch("yolov8n-nudenet", &models).unwrap();
    let g = golden("nudenet");
    let names = golden_images(&g);
    let ctx = ferry::engine::session_context();
    let manifests = ferry::ops::load_manifests(&root().join("operators")).unwrap();
    let mut set = ferry::ops::OperatorSet::new(manifests);
    ctx.register_udf(set.get("nudenet").unwrap().udf.clone());
    register_images(&ctx, &names);
    let batches = sql(&ctx, "SELECT name, nudenet(bytes) FROM imgs").await;
    let mut i = 0;
    let mut compared = 0;
    for col in rows(&batches) {
        for r in 0..col.len() {
            let name = &names[i];
            let want = g["rows"][i]["detections"].as_array().unwrap();
            i += 1;
            let got = detections(&col, r);
            let near_threshold = |s: f64| (s - 0.25).abs() <= 0.02;
            let mut matched = vec![false; got.len()];
            for w in want {
                let label = w["label"].as_str().unwrap();
                let score = w["score"].as_f64().unwrap();
                let b = floats(&w["box_xywh"]);
                let found = got.iter().enumerate().find(|(k, (l, _, bx))| {
                    !matched[*k]
                        && l == label
                        && (bx[0] - b[0]).abs() <= 2.0
                        && (bx[1] - b[1]).abs() <= 2.0
                        && (bx[2] - bx[0] - b[2]).abs() <= 2.0
                        && (bx[3] - bx[1] - b[3]).abs() <= 2.0
                });
                match found {
                    Some((k, (_, s, _))) => {
                        matched[k] = true;
                        assert!(
                            (s - score).abs() <= 0.02,
                            "{name}: {label} scores {s} vs {score}"
                        );
                        compared += 1;
                    }
                    None => assert!(
                        near_threshold(score),
                        "{name}: the package finds {label} {score} at {b:?}; ferry found {got:?}"
                    ),
                }
            }
            for (k, (label, score, bx)) in got.iter().enumerate() {
                assert!(
                    matched[k] || near_threshold(*score),
                    "{name}: ferry finds {label} {score} at {bx:?}, the package does not"
                );
            }
        }
    }
    assert!(
        compared >= 6,
        "the test images hold faces to compare ({compared})"
    );
}

/// A float16 export (inputs and outputs in f16): pixels are fed as f16 and logits read back;
/// results agree with the float32 model's goldens within float16's precision.
#[tokio::test]
async fn float16_models_take_and_give_float16() {
    let g = golden("tiny-vit");
    let (batches, names) = run("tiny_vit_fp16", "bytes", &g).await;
    let mut i = 0;
    for col in rows(&batches) {
        for r in 0..col.len() {
            let got = labels_scores(&col, r);
            let want = g["rows"][i]["all"].as_array().unwrap();
            for (label, score) in &got {
                let w = want.iter().find(|w| w["label"] == label.as_str()).unwrap();
                let ws = w["score"].as_f64().unwrap();
                assert!(
                    (score - ws).abs() <= 5e-3,
                    "{}: {label} {score} vs {ws}",
                    names[i]
                );
            }
            let gap = want[0]["score"].as_f64().unwrap() - want[1]["score"].as_f64().unwrap();
            if gap > 0.01 {
                assert_eq!(got[0].0, want[0]["label"].as_str().unwrap(), "{}", names[i]);
            }
            i += 1;
        }
    }
}

/// A worker holds one session per model file (encoder and decoder, detector and recognizer)
/// and state of its own kept between calls.
#[tokio::test]
async fn a_worker_holds_several_sessions_and_its_own_state() {
    use ferry::runtime::pool::{ModelFile, PoolSize, SessionPool};
    let models = root().join("tests/fixtures/models");
    let pool = SessionPool::open(
        &[
            ModelFile::new("image", models.join("tiny-vit/model.onnx")),
            ModelFile::new("text", models.join("tiny-bert-sentiment/model.onnx")),
        ],
        ferry::runtime::ExecutionProvider::Cpu,
        PoolSize {
            workers: 1,
            threads_per_worker: 1,
        },
    )
    .unwrap();
    assert_eq!(
        pool.session("image").unwrap().inputs[0].name,
        "pixel_values"
    );
    assert!(pool.session("text").unwrap().input("input_ids").is_some());
    let calls = pool
        .run(|worker| {
            use ferry::runtime::tensor::{Data, Input};
            let image = worker
                .run(
                    "image",
                    vec![Input::new(
                        "pixel_values",
                        vec![1, 3, 64, 64],
                        Data::F32(vec![0.0; 3 * 64 * 64]),
                    )],
                )
                .map(|o| o["logits"].try_extract_tensor::<f32>().unwrap().1.len())
                .unwrap();
            let ids = |v: Vec<i64>| Data::I64(v);
            let text = worker
                .run(
                    "text",
                    vec![
                        Input::new("input_ids", vec![1, 3], ids(vec![2, 15, 3])),
                        Input::new("attention_mask", vec![1, 3], ids(vec![1, 1, 1])),
                        Input::new("token_type_ids", vec![1, 3], ids(vec![0, 0, 0])),
                    ],
                )
                .map(|o| o["logits"].try_extract_tensor::<f32>().unwrap().1.len())
                .unwrap();
            *worker.state::<u32>() += 1;
            (image, text, worker.session("nope").is_err())
        })
        .await
        .unwrap();
    assert_eq!(calls, (5, 3, true));
    let kept = pool.run(|worker| *worker.state::<u32>()).await.unwrap();
    assert_eq!(kept, 1, "state stays on the worker between calls");
}

#[tokio::test]
async fn segment_matches_the_pipeline_panoptic_detr() {
    let g = golden("tiny-detr-panoptic");
    let dir = root().join("tests/fixtures/golden/segments/tiny-detr-panoptic");
    let mut segments_seen = 0;
    for (op, key) in [
        ("tiny_detr_panoptic", "default"),
        ("tiny_detr_panoptic_low", "low"),
    ] {
        let (batches, names) = run(op, "bytes", &g).await;
        let mut i = 0;
        for col in rows(&batches) {
            for r in 0..col.len() {
                let row = &g["rows"][i];
                let what = format!("{op} {}", names[i]);
                i += 1;
                let Some(want) = row.get(key) else {
                    // transformers cannot guess a 1x1 image's channel axis.
                    assert!(row.get("pipeline_error").is_some(), "{what}");
                    continue;
                };
                let list = col.as_list::<i32>().value(r);
                let s = list.as_struct();
                let want_segments = want["segments"].as_array().unwrap();
                assert_eq!(s.len(), want_segments.len(), "{what}: segments");
                let map = image::open(dir.join(want["map"].as_str().unwrap()))
                    .unwrap()
                    .to_luma8();
                let ambiguous: std::collections::HashSet<(u32, u32)> = want["ambiguous"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[1].as_u64().unwrap() as u32, p[0].as_u64().unwrap() as u32))
                    .collect();
                for (j, w) in want_segments.iter().enumerate() {
                    assert_eq!(
                        s.column(0).as_string::<i32>().value(j),
                        w["label"].as_str().unwrap(),
                        "{what}"
                    );
                    let score = s.column(1).as_primitive::<Float64Type>().value(j);
                    assert!(
                        (score - w["score"].as_f64().unwrap()).abs() <= 1e-4,
                        "{what}: score"
                    );
                    let mask = image::load_from_memory(s.column(2).as_binary::<i32>().value(j))
                        .unwrap()
                        .to_luma8();
                    let differ = mask
                        .enumerate_pixels()
                        .zip(map.pixels())
                        .filter(|((x, y, m), l)| {
                            (m[0] == 255) != (l[0] as usize == j + 1)
                                && !ambiguous.contains(&(*x, *y))
                        })
                        .count();
                    assert_eq!(differ, 0, "{what}: segment {j} differs in {differ} pixels");
                    segments_seen += 1;
                }
            }
        }
    }
    assert!(
        segments_seen >= 10,
        "the goldens hold segments to compare ({segments_seen})"
    );
}
