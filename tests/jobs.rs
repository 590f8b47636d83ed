//! Resumable batch jobs: a run that dies leaves its finished parts, and the next run of the same
//! job does only what is missing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::datafusion::arrow::array::RecordBatch;
use ferry::datafusion::arrow::compute::concat_batches;
use ferry::datafusion::arrow::ipc::reader::FileReader;
use ferry::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::pipeline::{write_pipeline, write_text_parts};
use crate::util::{ferry_bin, fixture_operators};

/// `files` Parquet files of `rows` distinct texts each, in `dir/in`.
fn write_inputs(dir: &Path, files: usize, rows: usize) -> PathBuf {
    let input = dir.join("in");
    write_text_parts(&input, files, rows, |f, i| {
        format!(
            "review {f}-{i}: {}",
            "the film was long and the plot thin ".repeat(1 + i % 7)
        )
    });
    input
}

fn pipeline(dir: &Path, input: &Path, output: &Path) -> PathBuf {
    write_pipeline(
        dir,
        &format!(
            "name: job\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: tiny_sentiment\n    inputs: [text]\n  - sql: SELECT id, text, tiny_sentiment FROM input WHERE id % 10 <> 3\nsink:\n  parquet:\n    path: {}\n",
            input.display(),
            output.display()
        ),
    )
}

fn ferry_run(pipeline: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("--operators")
        .arg(fixture_operators())
        .arg("run")
        .arg("-q")
        .arg(pipeline)
        .args(extra);
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The number in "NAME: the model ran on N inputs".
fn model_inputs(stderr: &str, name: &str) -> u64 {
    let prefix = format!("{name}: the model ran on ");
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix(&prefix)?
                .strip_suffix(" inputs")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no model count for {name} in:\n{stderr}"))
}

/// The rows of a Parquet file, in file order, as one batch.
fn parquet_rows(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Finished parts in a job directory, and the rows they hold.
fn finished_parts(job: &Path) -> (usize, u64) {
    let mut parts = 0;
    let mut rows = 0;
    for entry in std::fs::read_dir(job).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("part-") && name.ends_with(".arrow") {
            parts += 1;
            let reader = FileReader::try_new(File::open(&path).unwrap(), None).unwrap();
            rows += reader.map(|b| b.unwrap().num_rows() as u64).sum::<u64>();
        }
    }
    (parts, rows)
}

/// The finished parts of a job: name, inode and modification time (a file written again differs
/// in one of them, even where the inode is reused).
fn part_files(job: &Path) -> Vec<(String, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut parts: Vec<(String, u64, i64)> = std::fs::read_dir(job)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("part-") && name.ends_with(".arrow")
        })
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.ino(),
                m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            )
        })
        .collect();
    parts.sort();
    parts
}

const FILES: usize = 16;
const ROWS: usize = 1500;

#[test]
fn a_killed_job_resumes_where_it_stopped_and_writes_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(dir.path(), FILES, ROWS);
    // The filter runs before the operator (DataFusion pushes it down): the model runs on the
    // rows kept.
    let kept = FILES as u64 * (0..ROWS).filter(|id| id % 10 != 3).count() as u64;

    // Uninterrupted.
    let whole = dir.path().join("whole.parquet");
    let out = ferry_run(&pipeline(dir.path(), &input, &whole), &[])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(model_inputs(&stderr(&out), "tiny_sentiment"), kept);
    assert!(
        !ferry::job::job_dir(&whole).exists(),
        "a finished job leaves no parts"
    );

    // Killed once a few parts are finished.
    let resumed = dir.path().join("resumed.parquet");
    let p = pipeline(dir.path(), &input, &resumed);
    let job = ferry::job::job_dir(&resumed);
    let mut child = ferry_run(&p, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "no part was finished in time");
        if job.is_dir() && finished_parts(&job).0 >= 3 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (done, done_rows) = finished_parts(&job);
    assert!(
        done < FILES,
        "killed mid-job: {done} of {FILES} parts were finished"
    );
    assert!(!resumed.exists(), "no output before every part is done");

    let out = ferry_run(&p, &[]).output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "resumed an unfinished run: {done} of {FILES} parts were done"
        )),
        "{log}"
    );
    assert_eq!(
        model_inputs(&log, "tiny_sentiment"),
        kept - done_rows,
        "the model ran on the missing rows only"
    );
    assert!(!job.exists());
    let (a, b) = (parquet_rows(&whole), parquet_rows(&resumed));
    assert_eq!(b.num_rows() as u64, kept);
    assert_eq!(a, b, "the resumed run wrote the uninterrupted run's rows");
}

#[test]
fn a_changed_input_or_restart_starts_the_job_over() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    // Three CSV files; the last has a line with a field too many (past the first 1000 rows,
    // which schema inference reads), so the run fails after other parts are done.
    let csv = |f: usize, bad: bool| {
        let mut s = String::from("id,text\n");
        for i in 0..1000 {
            s.push_str(&format!("{},text {f} {i}\n", f * 1000 + i));
            if bad && i == 900 {
                s.push_str("9999,a,b\n");
            }
        }
        std::fs::write(input.join(format!("f{f}.csv")), s).unwrap();
    };
    for f in 0..3 {
        csv(f, f == 2);
    }
    let output = dir.path().join("out.parquet");
    let p = write_pipeline(
        dir.path(),
        &format!(
            "name: job\nsource:\n  csv:\n    path: {}\nsteps:\n  - operator: tiny_sentiment\n    inputs: [text]\nsink:\n  parquet:\n    path: {}\n",
            input.display(),
            output.display()
        ),
    );
    let job = ferry::job::job_dir(&output);

    let out = ferry_run(&p, &[]).output().unwrap();
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(log.contains("f2.csv"), "the error names the file: {log}");
    assert!(!output.exists());
    assert!(job.join("job.json").exists(), "the failed run kept its job");

    // The same job again: the finished parts are kept (the same files), and it fails on the
    // same file.
    let first = part_files(&job);
    assert!(!first.is_empty(), "a part finished before f2.csv failed");
    let out = ferry_run(&p, &[]).output().unwrap();
    assert!(!out.status.success());
    let again = part_files(&job);
    for part in &first {
        assert!(again.contains(part), "{part:?} was kept");
    }

    // --restart: every earlier part goes (a part written again is a new file).
    let out = ferry_run(&p, &["--restart"]).output().unwrap();
    assert!(!out.status.success());
    let restarted = part_files(&job);
    for part in &again {
        assert!(!restarted.contains(part), "{part:?} was discarded");
    }

    // A fixed input is another job: started over, all rows run.
    csv(2, false);
    let out = ferry_run(&p, &[]).output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("resumed"), "{log}");
    assert_eq!(model_inputs(&log, "tiny_sentiment"), 3000);
    assert_eq!(parquet_rows(&output).num_rows(), 3000);
    assert!(!job.exists());
}
