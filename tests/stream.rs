//! Streams against a real broker (tansu, started per test on 127.0.0.1) and, for transaction
//! isolation, librdkafka's mock cluster.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::datafusion::arrow::array::AsArray;
use ferry::datafusion::arrow::datatypes::{Int32Type, Int64Type};
use ferry::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ferry::rdkafka::ClientConfig;
use ferry::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use ferry::rdkafka::client::DefaultClientContext;
use ferry::rdkafka::consumer::{BaseConsumer, Consumer};
use ferry::rdkafka::message::{Headers, Message, OwnedMessage};
use ferry::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use ferry::stream::devbroker::DevBroker;

use crate::util::{ferry_bin, fixture_operators};

/// A unique name per test and run (tansu groups can stick when all members leave).
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))
    .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Produces `(key, value)` records and waits for every acknowledgement.
fn produce(brokers: &str, topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for (key, value) in records {
        let mut rec = BaseRecord::<[u8], [u8]>::to(topic).payload(&value[..]);
        if let Some(k) = key {
            rec = rec.key(k.as_bytes());
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(20));
                    rec = r;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Reads `topic` from the start until `want` records arrived or `timeout` passed.
fn consume(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
    extra: &[(&str, &str)],
) -> Vec<OwnedMessage> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    // A little longer, to catch records beyond `want` (duplicates).
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

fn json_texts(n: usize) -> Vec<(Option<String>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let text = format!(
                "review {i}: the {} was {}",
                ["film", "meal", "hotel"][i % 3],
                ["great", "awful", "fine"][i % 3]
            );
            (
                Some(i.to_string()),
                serde_json::to_vec(&serde_json::json!({"id": i, "text": text})).unwrap(),
            )
        })
        .collect()
}

fn write_pipeline(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("pipeline.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn ferry(pipeline: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("--operators")
        .arg(fixture_operators())
        .arg("run")
        .arg(pipeline)
        .arg("--quiet")
        .args(args)
        .env("RUST_LOG", "ferry=info,warn");
    cmd
}

fn run_ok(pipeline: &Path, args: &[&str]) -> Output {
    let out = ferry(pipeline, args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry failed: {stderr}");
    out
}

/// Starts ferry with its log going to `<pipeline dir>/ferry-<n>.log` (see [`logs`]).
fn spawn(pipeline: &Path, args: &[&str]) -> Child {
    let dir = pipeline.parent().unwrap();
    let n = std::fs::read_dir(dir).unwrap().count();
    let log = std::fs::File::create(dir.join(format!("ferry-{n}.log"))).unwrap();
    ferry(pipeline, args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Every ferry log written beside `pipeline`, for failure messages.
fn logs(pipeline: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(pipeline.parent().unwrap())
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ferry-") && name.ends_with(".log") {
            out += &format!(
                "--- {name}\n{}\n",
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
    }
    out
}

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// `(partition, offset)` → count, over every Parquet file under `dir`.
fn parquet_offsets(dir: &Path) -> (HashMap<(i32, i64), usize>, Vec<PathBuf>) {
    let mut counts = HashMap::new();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet")
                && !e.file_name().to_string_lossy().starts_with('.')
            {
                files.push(p);
            }
        }
    }
    for f in &files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let p = b
                .column_by_name("_partition")
                .unwrap()
                .as_primitive::<Int32Type>()
                .clone();
            let o = b
                .column_by_name("_offset")
                .unwrap()
                .as_primitive::<Int64Type>()
                .clone();
            for i in 0..b.num_rows() {
                *counts.entry((p.value(i), o.value(i))).or_insert(0) += 1;
            }
        }
    }
    (counts, files)
}

fn wait_for(what: &str, pipeline: &Path, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs(pipeline)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill9(child: &mut Child) {
    unsafe_kill(child.id(), 9);
    let _ = child.wait();
}

fn unsafe_kill(pid: u32, signal: i32) {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

const FAST_GROUP: &str = "session.timeout.ms: \"6000\"\n      heartbeat.interval.ms: \"500\"";

#[test]
fn json_to_kafka_enriches_every_record_once() {
    let broker = DevBroker::start().unwrap();
    let (input, output) = (unique("reviews"), unique("enriched"));
    create_topic(&broker.addr, &input, 3);
    let n = 300;
    produce(&broker.addr, &input, &json_texts(n));
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        &format!(
            r#"
name: reviews-stream
source:
  kafka:
    brokers: {brokers}
    topics: [{input}]
    group_id: {group}
    columns: {{id: int64, text: string}}
    max_batch_rows: 64
    max_batch_wait: 100ms
    properties:
      {FAST_GROUP}
steps:
  - operator: tiny_sentiment
    inputs: [text]
    output: sentiment
sink:
  kafka:
    topic: {output}
    key: id
"#,
            brokers = broker.addr,
            group = unique("g"),
        ),
    );
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut child = spawn(
        &pipeline,
        &["--until-idle", "4s", "--metrics", &metrics_addr],
    );
    // The metrics endpoint shows the records going through while the stream runs.
    let mut scraped = String::new();
    wait_for(
        "metrics to count every record",
        &pipeline,
        Duration::from_secs(60),
        || {
            if let Ok(mut s) = std::net::TcpStream::connect(&metrics_addr) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                scraped.clear();
                let _ = s.read_to_string(&mut scraped);
            }
            scraped.contains(&format!("ferry_records_in_total {n}"))
        },
    );
    assert!(
        scraped.contains("ferry_operator_seconds_count{operator=\"tiny_sentiment\"}"),
        "{scraped}"
    );
    assert!(
        scraped.contains(&format!("ferry_records_out_total {n}")),
        "{scraped}"
    );
    let status = child.wait().unwrap();
    assert!(status.success());

    let got = consume(&broker.addr, &output, n, Duration::from_secs(30), &[]);
    assert_eq!(got.len(), n, "exactly N records out");
    let mut ids = Vec::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let id = v["id"].as_i64().unwrap();
        ids.push(id);
        assert_eq!(
            m.key().unwrap(),
            id.to_string().as_bytes(),
            "key is the id column"
        );
        let label = v["sentiment"]["label"].as_str().unwrap();
        assert!(!label.is_empty());
        assert!(
            v.get("_offset").is_none(),
            "lineage goes to headers, not the value"
        );
        assert_eq!(header(m, "ferry.source.topic").unwrap(), input);
        assert!(
            header(m, "ferry.source.offset")
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
    }
    ids.sort();
    assert_eq!(ids, (0..n as i64).collect::<Vec<_>>());
}
