//! The `ferry` binary: exit codes and what it prints.

use std::process::Command;

use crate::pipeline::{write_pipeline, write_texts};
use crate::util::*;

fn ferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ferry_bin())
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_all_problems_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "name: t\nsource:\n  parquet:\n    path: in.parquet\n    colour: red\nsteps:\n  - operator: x\nsink:\n  parquet:\n    path: out.parquet\n    compression: lzma\n";
    let file = write_pipeline(dir.path(), yaml);
    let ops = fixture_operators();
    let (ok, stdout, stderr) = ferry(&[
        "--operators",
        ops.to_str().unwrap(),
        "validate",
        file.to_str().unwrap(),
    ]);
    assert!(!ok);
    // Problems go to stderr (a script reading stdout sees only what passed).
    assert!(!stdout.contains("unknown field"), "{stdout}");
    for problem in [
        ":5:5: source.parquet.colour: unknown field `colour`",
        ":7:5: steps[0].operator: an operator step needs `inputs`",
        ":11:5: sink.parquet.compression: unknown variant `lzma`",
    ] {
        assert!(stderr.contains(problem), "{problem}\n{stderr}");
    }
}

#[test]
fn run_then_query_with_operators_as_functions() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(
        &input,
        &[
            Some("great product would buy again"),
            Some("worst purchase ever"),
        ],
    );
    let output = dir.path().join("out.parquet");
    let yaml = format!(
        "name: reviews\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: tiny_embed\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        output.display()
    );
    write_pipeline(dir.path(), &yaml);
    let ops = fixture_operators();
    let (ok, _, stderr) = ferry(&[
        "--operators",
        ops.to_str().unwrap(),
        "run",
        "--quiet",
        dir.path().join("p.yaml").to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2 rows"), "{stderr}");

    // The pipeline's output is a table named after the pipeline; operators are SQL functions.
    let (ok, stdout, stderr) = ferry(&[
        "--operators",
        ops.to_str().unwrap(),
        "query",
        "--pipelines",
        dir.path().to_str().unwrap(),
        "SELECT id, tiny_sentiment(text)['label'] AS label, round(cosine_similarity(embedding, tiny_embed('good product')), 3) AS sim FROM reviews ORDER BY id",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| id | label"), "{stdout}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("| 0") || l.starts_with("| 1"))
            .count(),
        2,
        "{stdout}"
    );

    // --table and --output.
    let csv = dir.path().join("q.csv");
    let (ok, stdout, stderr) = ferry(&[
        "query",
        "--table",
        &format!("r={}", output.display()),
        "--output",
        csv.to_str().unwrap(),
        "SELECT id, text FROM r ORDER BY id",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote 2 rows"), "{stdout}");
    assert!(
        std::fs::read_to_string(&csv)
            .unwrap()
            .starts_with("id,text\n0,great product")
    );
}

#[test]
fn operators_lists_name_task_model_and_types() {
    let ops = fixture_operators();
    let (ok, stdout, stderr) = ferry(&["--operators", ops.to_str().unwrap(), "operators"]);
    assert!(ok, "{stderr}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
            .to_string()
    };
    let line = row("tiny_sentiment");
    assert!(line.contains("| classify_text "), "{line}");
    assert!(
        line.contains("tests/fixtures/models/tiny-bert-sentiment"),
        "{line}"
    );
    assert!(
        line.contains(r#"Struct("label": non-null Utf8, "score": non-null Float64)"#),
        "{line}"
    );
    let line = row("tiny_embed");
    assert!(
        line.contains("FixedSizeList(32 x non-null Float32)"),
        "{line}"
    );
}

#[test]
fn an_unloadable_runtime_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, &[Some("a")]);
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: tiny_embed\n    inputs: [text]\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        dir.path().join("o.parquet").display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    let ops = fixture_operators();
    let out = Command::new(ferry_bin())
        .args([
            "--operators",
            ops.to_str().unwrap(),
            "run",
            "-q",
            file.to_str().unwrap(),
        ])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load ONNX Runtime from /nonexistent/libonnxruntime.so"),
        "{stderr}"
    );
    assert!(stderr.contains("set ORT_DYLIB_PATH"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_runtime_library_older_than_ferry_needs_is_reported() {
    // ONNX Runtime 1.20 predates the C API version ferry is built against (1.24).
    let cache = ferry::runtime::cache_dir().join("test-old-onnxruntime");
    let lib = cache.join("libonnxruntime.so.1.20.1");
    if !lib.is_file() {
        let wheel = ferry::runtime::wheel::download("onnxruntime==1.20.1", &cache).unwrap();
        let bytes =
            ferry::runtime::wheel::read_member(&wheel, "capi/libonnxruntime.so.1.20.1").unwrap();
        ferry::runtime::wheel::write_atomically(&lib, &bytes).unwrap();
        std::fs::remove_file(wheel).unwrap();
    }
    let ops = fixture_operators();
    let out = Command::new(ferry_bin())
        .args(["--operators", ops.to_str().unwrap(), "operators"])
        .env("ORT_DYLIB_PATH", &lib)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("expected version >= '1.24.x', but got '1.20.1'"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// SQL errors read as one message: each cause once, and an operator's own words about its
/// arguments (never DataFusion's internal error or the stream's lineage arguments).
#[test]
fn query_errors_read_as_one_message() {
    let ops = fixture_operators();
    let query = |sql: &str| {
        let (ok, _, stderr) = ferry(&["--operators", ops.to_str().unwrap(), "query", sql]);
        assert!(!ok, "{sql}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        stderr
    };
    let err = query("SELECT nosuch FROM (SELECT 1 AS a) x");
    assert_eq!(err.matches("No field named nosuch").count(), 1, "{err}");
    assert_eq!(err.matches("Schema error").count(), 1, "{err}");
    let err = query("SELECT tiny_sentiment(42)");
    assert!(
        err.contains("tiny_sentiment (classify_text) expects text (Utf8, LargeUtf8 or Utf8View); argument 1 is Int64"),
        "{err}"
    );
    for (sql, got) in [
        ("SELECT tiny_sentiment()", "got 0"),
        ("SELECT tiny_sentiment('a', 'b', 'c')", "got 3"),
        ("SELECT tiny_sentiment('a', 'b', 'c', 'd')", "got 4"),
    ] {
        let err = query(sql);
        assert!(
            err.contains("tiny_sentiment (classify_text) takes 1 to 2 argument(s)")
                && err.contains(got),
            "{sql}: {err}"
        );
        for leak in ["Internal error", "Int32, Int64", "Candidate functions"] {
            assert!(!err.contains(leak), "{sql}: {err}");
        }
    }
}

/// A table that is not there: `ferry query` names the pipelines it skipped and why.
#[test]
fn query_names_the_pipelines_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("never-written.parquet");
    std::fs::write(
        dir.path().join("a.yaml"),
        format!(
            "name: reviews\nsource:\n  parquet:\n    path: in.parquet\nsteps: []\nsink:\n  parquet:\n    path: {}\n",
            missing.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.yaml"), "name: [broken\n").unwrap();
    let (ok, _, stderr) = ferry(&[
        "query",
        "--pipelines",
        dir.path().to_str().unwrap(),
        "SELECT * FROM reviews",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("table 'datafusion.public.reviews' not found"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a.yaml: pipeline 'reviews' has no output yet")
            && stderr.contains("never-written.parquet does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("b.yaml: not a valid pipeline"), "{stderr}");
}

/// `ferry cache stats` shows an operator's cached entries; `ferry cache clear` removes them.
#[test]
fn cache_stats_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("operators");
    std::fs::create_dir_all(&ops).unwrap();
    std::fs::write(
        ops.join("cached.yaml"),
        format!(
            "name: cached\ntask: classify_text\nmodel: {}\ncache: {{dir: ../cache}}\n",
            fixture_model("tiny-bert-sentiment")
        ),
    )
    .unwrap();
    let ops = ops.to_str().unwrap();
    let (ok, _, stderr) = ferry(&[
        "--operators",
        ops,
        "query",
        "SELECT cached(t) FROM (VALUES ('one'), ('two'), ('one'), ('three')) AS v(t)",
    ]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = ferry(&["--operators", ops, "cache", "stats"]);
    assert!(ok, "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("cached "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1], "3", "three distinct texts: {row}");
    assert!(row.contains("tiny-bert-sentiment"), "{row}");

    let (ok, stdout, stderr) =
        ferry(&["--operators", ops, "cache", "clear", "--operator", "cached"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("removed the cached results of 1 operator(s)"),
        "{stdout}"
    );
    let (_, stdout, _) = ferry(&["--operators", ops, "cache", "stats"]);
    assert!(
        !stdout.lines().any(|l| l.starts_with("cached ")),
        "{stdout}"
    );
}

/// Paths in a pipeline are relative to the pipeline file, not to where ferry runs (here the
/// repository root): `../data/in.parquet` from `<tmp>/pipelines/p.yaml` is
/// `<tmp>/data/in.parquet`. Before, both paths were taken from the working directory.
#[test]
fn pipeline_paths_are_relative_to_the_pipeline_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    write_texts(
        &dir.path().join("data/in.parquet"),
        &[Some("first"), Some("second")],
    );
    let yaml = "name: relative\nsource:\n  parquet:\n    path: ../data/in.parquet\nsink:\n  jsonl:\n    path: ../out/texts.jsonl\n";
    let file = write_pipeline(&dir.path().join("pipelines"), yaml);
    let (ok, _, stderr) = ferry(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{stderr}");
    let written = std::fs::read_to_string(dir.path().join("out/texts.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 2, "{written}");
    assert!(!root().join("out/texts.jsonl").exists());
}

/// `ferry query` with no SQL is a SQL shell; with a pipe for input it runs the statements as a
/// script: statements over several lines, `\d`, operators called as they come, an error that
/// does not end the shell, history kept, nothing after `\q`.
#[test]
fn query_without_sql_is_a_shell() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, &[Some("great product"), Some("worst purchase")]);
    let history = dir.path().join("history");
    let ops = fixture_operators();
    let mut child = Command::new(ferry_bin())
        .args([
            "--operators",
            ops.to_str().unwrap(),
            "query",
            "--pipelines",
            dir.path().to_str().unwrap(),
            "--table",
            &format!("r={}", input.display()),
        ])
        .env("FERRY_HISTORY", &history)
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"\\d\n\\d r\n\\d tiny_sentiment\nSELECT id,\n  tiny_sentiment(text)['label'] AS label -- a comment; not the end\nFROM r ORDER BY id;\nSELECT nosuch FROM r;\nSELECT count(*) AS n FROM r; SELECT 'x;y' AS s;\n\\q\nSELECT 'after quit';\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for expected in [
        "tables:",
        "  r\n",
        "tiny_sentiment  classify_text",
        "  text  ",
        "operator tiny_sentiment: classify_text (text-classification)",
        "| id | label",
        "2 rows in",
        "| n |",
        "| x;y |",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    assert_eq!(
        stderr.matches("No field named nosuch").count(),
        1,
        "{stderr}"
    );
    assert!(!stdout.contains("after quit"), "{stdout}");
    let kept = std::fs::read_to_string(&history).unwrap();
    assert!(kept.contains("SELECT count(*) AS n FROM r"), "{kept}");
}
