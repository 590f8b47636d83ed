//! Shared helpers: fixture paths, golden files, and a SQL context with the fixture operators.

use std::path::PathBuf;
use std::sync::Arc;

use ferry::datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use ferry::datafusion::arrow::datatypes::{DataType, Field, Schema};
use ferry::datafusion::datasource::MemTable;
use ferry::datafusion::prelude::SessionContext;
use ferry::engine::session_context;
use ferry::ops::OperatorSet;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_operators() -> PathBuf {
    root().join("tests/fixtures/operators")
}

/// The path of a fixture model directory, for manifests written by tests.
pub fn fixture_model(name: &str) -> String {
    root()
        .join("tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

pub fn golden(name: &str) -> serde_json::Value {
    let path = root().join(format!("tests/fixtures/golden/{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The golden file's texts.
pub fn golden_texts(g: &serde_json::Value) -> Vec<String> {
    g["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect()
}

/// A context with the fixture operators named in `ops` registered.
pub fn context_with(ops: &[&str]) -> (SessionContext, OperatorSet) {
    let ctx = session_context();
    let manifests = ferry::ops::load_manifests(&fixture_operators()).unwrap();
    let mut set = OperatorSet::new(manifests);
    for name in ops {
        let op = set.get(name).unwrap_or_else(|e| panic!("{e}"));
        ctx.register_udf(op.udf.clone());
    }
    (ctx, set)
}

/// Registers a table `t(id Int64, text Utf8)` with the given texts (None = null).
pub fn register_texts(ctx: &SessionContext, texts: &[Option<&str>]) {
    let ids: ArrayRef = Arc::new(ferry::datafusion::arrow::array::Int64Array::from(
        (0..texts.len() as i64).collect::<Vec<_>>(),
    ));
    let text: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![ids, text]).unwrap();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
}

pub async fn sql(ctx: &SessionContext, q: &str) -> Vec<RecordBatch> {
    ctx.sql(q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
}

pub async fn sql_err(ctx: &SessionContext, q: &str) -> String {
    match ctx.sql(q).await {
        Err(e) => e.to_string(),
        Ok(df) => match df.collect().await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{q}: expected an error"),
        },
    }
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Asserts two embeddings agree as the goldens require.
#[track_caller]
pub fn assert_close_vectors(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let cos = cosine(got, want);
    assert!(max_diff <= 1e-4, "{what}: max abs diff {max_diff}");
    assert!(cos >= 0.9999, "{what}: cosine {cos}");
}

/// The path of the ferry binary built for these tests.
pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// Registers `table(name Utf8, bytes Binary, path Utf8)` with the files `names` of the fixture
/// folder `dir` (relative to the repository root): their bytes and relative paths.
pub fn register_files(ctx: &SessionContext, table: &str, dir: &str, names: &[String]) {
    let bytes: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(root().join(dir).join(n)).unwrap())
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(names.to_vec())),
        Arc::new(ferry::datafusion::arrow::array::BinaryArray::from_iter_values(bytes.iter())),
        Arc::new(StringArray::from(
            names
                .iter()
                .map(|n| format!("{dir}/{n}"))
                .collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    ctx.register_table(
        table,
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
}

/// A context with one operator per (name, manifest body) written into a temporary directory.
pub fn context_with_manifests(
    manifests: &[(&str, String)],
) -> (
    ferry::datafusion::prelude::SessionContext,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in manifests {
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            format!("name: {name}\n{body}"),
        )
        .unwrap();
    }
    let ctx = ferry::engine::session_context();
    let mut set = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(dir.path()).unwrap());
    for (name, _) in manifests {
        let op = set.get(name).unwrap_or_else(|e| panic!("{e}"));
        ctx.register_udf(op.udf.clone());
    }
    (ctx, dir)
}

/// pyarrow from its PyPI wheel, unpacked once into the cache, for tests that read ferry's
/// outputs as Python users do: the directory to put on `PYTHONPATH`.
pub fn pyarrow() -> PathBuf {
    const REQUIREMENT: &str = "pyarrow==26.0.1";
    let dir = ferry::runtime::cache_dir().join("test-pyarrow-26.0.1");
    let site = dir.join("site");
    if site.join("pyarrow").join("__init__.py").is_file() {
        return site;
    }
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = UNPACKING.lock().unwrap_or_else(|p| p.into_inner());
    if !site.join("pyarrow").join("__init__.py").is_file() {
        let wheel = ferry::runtime::wheel::download(REQUIREMENT, &dir.join("wheel"))
            .unwrap_or_else(|e| panic!("{e}"));
        let tmp = dir.join(format!("site.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        zip::ZipArchive::new(std::fs::File::open(&wheel).unwrap())
            .unwrap()
            .extract(&tmp)
            .unwrap();
        let _ = std::fs::remove_dir_all(&site);
        std::fs::rename(&tmp, &site).unwrap();
    }
    site
}

/// Runs a Python snippet with [`pyarrow`] importable; panics with its output when it fails.
pub fn run_python_with_pyarrow(code: &str) -> String {
    let python = std::env::var("FERRY_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = std::process::Command::new(python)
        .args(["-c", code])
        .env("PYTHONPATH", pyarrow())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{code}\n{text}");
    text
}
