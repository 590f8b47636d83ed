//! Batch jobs on a Ballista cluster: a scheduler and two executors on 127.0.0.1, started here
//! as `ferry scheduler` and `ferry executor` processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::datafusion::arrow::array::{AsArray, RecordBatch};
use ferry::datafusion::arrow::datatypes::{Float32Type, Int64Type};
use ferry::datafusion::prelude::SessionContext;

use crate::pipeline::write_text_parts;
use crate::util::{ferry_bin, fixture_operators};

/// A process killed when the test ends, however it ends; its stderr goes to `log`.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(args: &[&str], log: PathBuf) -> Process {
        let child = Command::new(ferry_bin())
            .arg("--operators")
            .arg(fixture_operators())
            .arg("-v")
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(addr: &str) -> String {
    let mut page = String::new();
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = s.read_to_string(&mut page);
    }
    page
}

/// Calls of `operator` an executor's metrics page counts.
fn operator_calls(page: &str, operator: &str) -> u64 {
    let prefix = format!("ferry_operator_seconds_count{{operator=\"{operator}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The metrics address an executor printed.
fn metrics_addr(p: &Process) -> Option<String> {
    p.log().lines().find_map(|l| {
        l.strip_prefix("metrics on http://")?
            .strip_suffix("/metrics")
            .map(str::to_string)
    })
}

/// (id, embedding) of every row of a Parquet file or directory, by id.
async fn embeddings(path: &Path) -> Vec<(i64, Vec<f32>)> {
    let ctx = SessionContext::new();
    ferry::source::register_file(&ctx, "t", path.to_str().unwrap())
        .await
        .unwrap();
    let batches: Vec<RecordBatch> = ctx
        .sql("SELECT id, embedding FROM t ORDER BY id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let emb = b.column(1).as_fixed_size_list();
        for i in 0..b.num_rows() {
            let v = emb.value(i);
            out.push((
                ids.value(i),
                v.as_primitive::<Float32Type>().values().to_vec(),
            ));
        }
    }
    out
}

fn write_inputs(dir: &Path, files: usize, rows: usize) {
    write_text_parts(dir, files, rows, |f, i| {
        format!(
            "file {f} row {i}: {}",
            "a cluster runs the model ".repeat(1 + i % 5)
        )
    });
}

/// Embeds the texts of `input` (ids made unique across files) into `out`.
fn pipeline(dir: &Path, name: &str, input: &Path, out: &Path) -> PathBuf {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "name: {name}\nsource:\n  parquet:\n    path: {}\nsteps:\n  - sql: SELECT id * 10 + CAST(substr(text, 6, 1) AS BIGINT) AS id, text FROM input\n  - operator: tiny_embed\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
            input.display(),
            out.display()
        ),
    )
    .unwrap();
    file
}

fn run_on_cluster(pipeline: &Path, scheduler: &str) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("--operators")
        .arg(fixture_operators())
        .args(["run", "-q"])
        .arg(pipeline)
        .arg("--cluster")
        .arg(format!("df://{scheduler}"));
    cmd
}

/// A scheduler and two executors run a pipeline (the operator on both executors) with the local
/// run's rows and embeddings; then an executor is killed in the middle of a larger job, and the
/// job either completes with every row once (Ballista runs the lost tasks again) or fails with
/// nothing under the sink's name.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_runs_on_two_executors_with_the_local_result() {
    let dir = tempfile::tempdir().unwrap();
    // Four files, so the scan has four partitions for the two executors to share.
    let input = dir.path().join("in");
    write_inputs(&input, 4, 300);

    let scheduler_port = free_port();
    let scheduler_addr = format!("127.0.0.1:{scheduler_port}");
    let scheduler = Process::start(
        &[
            "scheduler",
            "--bind",
            &scheduler_addr,
            "--executor-timeout",
            "10s",
        ],
        dir.path().join("scheduler.log"),
    );
    wait_until("the scheduler", Duration::from_secs(60), || {
        TcpStream::connect(&scheduler_addr).is_ok()
    });
    let mut executors: Vec<Process> = (0..2)
        .map(|i| {
            let work = dir.path().join(format!("work-{i}"));
            std::fs::create_dir_all(&work).unwrap();
            let port = free_port().to_string();
            Process::start(
                &[
                    "executor",
                    "--scheduler",
                    &scheduler_addr,
                    "--port",
                    &port,
                    "--slots",
                    "1",
                    "--metrics",
                    "127.0.0.1:0",
                    "--work-dir",
                    work.to_str().unwrap(),
                ],
                dir.path().join(format!("executor-{i}.log")),
            )
        })
        .collect();
    for e in &executors {
        wait_until("an executor's metrics", Duration::from_secs(60), || {
            metrics_addr(e).is_some()
        });
    }
    let logs = |client: &[u8], executors: &[Process]| {
        let mut all = format!(
            "client:\n{}\nscheduler:\n{}",
            String::from_utf8_lossy(client),
            scheduler.log()
        );
        for (i, e) in executors.iter().enumerate() {
            all.push_str(&format!("\nexecutor {i}:\n{}", e.log()));
        }
        all
    };

    let cluster_out = dir.path().join("cluster.parquet");
    let out = run_on_cluster(
        &pipeline(dir.path(), "small", &input, &cluster_out),
        &scheduler_addr,
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", logs(&out.stderr, &executors));
    assert!(cluster_out.is_dir(), "the executors' files");

    let local_out = dir.path().join("local.parquet");
    ferry::engine::run_file(
        &pipeline(dir.path(), "local", &input, &local_out),
        &fixture_operators(),
        true,
    )
    .await
    .unwrap();
    let (cluster, local) = (embeddings(&cluster_out).await, embeddings(&local_out).await);
    assert_eq!(cluster.len(), 1200);
    assert_eq!(
        cluster.iter().map(|r| r.0).collect::<Vec<_>>(),
        local.iter().map(|r| r.0).collect::<Vec<_>>(),
        "the same rows"
    );
    for ((id, a), (_, b)) in cluster.iter().zip(&local) {
        let cos = crate::util::cosine(
            &a.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            &b.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        assert!(cos > 0.99999, "row {id}: cosine {cos}");
    }
    let calls: Vec<u64> = executors
        .iter()
        .map(|e| operator_calls(&scrape(&metrics_addr(e).unwrap()), "tiny_embed"))
        .collect();
    assert!(
        calls.iter().all(|&c| c > 0),
        "both executors ran the operator: {calls:?}\n{}",
        logs(&out.stderr, &executors)
    );

    // `ferry query --cluster`: the operator runs on the executors, the result comes back.
    let out = Command::new(ferry_bin())
        .arg("--operators")
        .arg(fixture_operators())
        .arg("query")
        .arg("SELECT count(*) AS n, sum(cardinality(tiny_embed(text))) AS dims FROM t")
        .arg("--table")
        .arg(format!("t={}", input.display()))
        .arg("--cluster")
        .arg(format!("df://{scheduler_addr}"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", logs(&out.stderr, &executors));
    assert!(
        table.contains("| 1200 | 38400 |"),
        "1200 rows of 32 dimensions:\n{table}"
    );

    // A larger job; executor 0 is killed once it has worked on it.
    let big = dir.path().join("big");
    write_inputs(&big, 4, 12_000);
    let big_out = dir.path().join("big.parquet");
    let client = run_on_cluster(
        &pipeline(dir.path(), "big", &big, &big_out),
        &scheduler_addr,
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let first = metrics_addr(&executors[0]).unwrap();
    wait_until(
        "executor 0 working on the job",
        Duration::from_secs(120),
        || operator_calls(&scrape(&first), "tiny_embed") > calls[0],
    );
    let _ = executors[0].child.kill();
    let _ = executors[0].child.wait();
    let finished = client.wait_with_output().unwrap();
    let log = logs(&finished.stderr, &executors);
    eprintln!(
        "after the kill the job {}",
        if finished.status.success() {
            "completed"
        } else {
            "failed"
        }
    );
    if finished.status.success() {
        let rows = embeddings(&big_out).await;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        ids.dedup();
        assert_eq!(ids.len(), 48_000, "every row once\n{log}");
        assert_eq!(rows.len(), 48_000, "every row once\n{log}");
    } else {
        assert!(!big_out.exists(), "no partial output\n{log}");
        assert!(log.contains("the cluster job failed"), "{log}");
    }
    executors.clear();
}
