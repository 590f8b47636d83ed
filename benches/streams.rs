//! Stream benchmarks on a local broker (tansu, started here):
//!
//! 1. Kafka → Kafka pass-through (JSON in, JSON out, no operator) against a plain rdkafka loop
//!    that consumes each record and produces it to another topic.
//! 2. Kafka → rolling Parquet pass-through against a plain rdkafka consume-only loop.
//! 3. Kafka → minilm embed → Kafka against the batch job (Parquet → minilm → Parquet) over the
//!    same texts.
//!
//! Rates are measured from the first record's arrival, so the consumer group join (the same for
//! both sides) is left out. `FERRY_BENCH_RECORDS` (default 200000) and
//! `FERRY_BENCH_EMBED_ROWS` (default 1000) size the runs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{bench_texts, env_usize};
use ferry::rdkafka::ClientConfig;
use ferry::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use ferry::rdkafka::client::DefaultClientContext;
use ferry::rdkafka::consumer::{BaseConsumer, Consumer};
use ferry::rdkafka::message::Message;
use ferry::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use ferry::stream::StreamOptions;
use ferry::stream::devbroker::DevBroker;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos}")
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for r in futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .unwrap()
    {
        r.unwrap();
    }
}

fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

fn send(p: &BaseProducer, topic: &str, key: &[u8], value: &[u8]) {
    let mut rec = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                p.poll(Duration::from_millis(5));
                rec = r;
            }
        }
    }
}

fn fill(brokers: &str, topic: &str, values: &[Vec<u8>]) {
    let p = producer(brokers);
    for (i, v) in values.iter().enumerate() {
        send(&p, topic, i.to_string().as_bytes(), v);
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// A plain rdkafka loop: consume `n` records, producing each to `copy_to` when given.
/// Returns records/s from the first record.
fn plain_loop(brokers: &str, topic: &str, n: usize, copy_to: Option<&str>) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("plain"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let p = producer(brokers);
    let mut first = None;
    let mut seen = 0;
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            if let Some(out) = copy_to {
                send(
                    &p,
                    out,
                    m.key().unwrap_or_default(),
                    m.payload().unwrap_or_default(),
                );
                p.poll(Duration::ZERO);
            }
            seen += 1;
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
    n as f64 / first.unwrap().elapsed().as_secs_f64()
}

/// A plain rdkafka loop doing the work of the Kafka → Parquet pipeline by hand: consume `n`
/// records, decode their JSON in blocks of 1,024 with arrow-json, add the lineage columns ferry
/// adds (`_topic`, `_partition`, `_offset`, `_timestamp`), and write them to one Parquet file
/// with the rolling sink's default writer properties (zstd): the same columns and bytes as
/// ferry's output.
fn plain_parquet_loop(brokers: &str, topic: &str, n: usize, out: &Path) -> f64 {
    use ferry::datafusion::arrow::array::{
        ArrayRef, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
        TimestampMillisecondBuilder,
    };
    use ferry::datafusion::arrow::datatypes::{DataType, Field, Schema};
    use ferry::datafusion::arrow::json::ReaderBuilder;
    use ferry::datafusion::parquet::arrow::ArrowWriter;
    use std::sync::Arc;
    let payload = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("text", DataType::Utf8, true),
    ]));
    let mut fields: Vec<Field> = payload
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(ferry::source::kafka::lineage_fields());
    let schema = Arc::new(Schema::new(fields));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("plain-pq"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let props = ferry::spec::ParquetCompression::default().writer_properties();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(out).unwrap(),
        schema.clone(),
        Some(props),
    )
    .unwrap();
    let mut decoder = ReaderBuilder::new(payload.clone())
        .with_batch_size(1024)
        .build_decoder()
        .unwrap();
    let mut lineage = (
        StringBuilder::new(),
        Int32Builder::new(),
        Int64Builder::new(),
        TimestampMillisecondBuilder::new().with_timezone("UTC"),
    );
    let mut flush = |decoder: &mut ferry::datafusion::arrow::json::reader::Decoder,
                     lineage: &mut (
        StringBuilder,
        Int32Builder,
        Int64Builder,
        TimestampMillisecondBuilder,
    )| {
        if let Some(b) = decoder.flush().unwrap() {
            let mut columns: Vec<ArrayRef> = b.columns().to_vec();
            columns.push(Arc::new(lineage.0.finish()));
            columns.push(Arc::new(lineage.1.finish()));
            columns.push(Arc::new(lineage.2.finish()));
            columns.push(Arc::new(lineage.3.finish().with_timezone("UTC")));
            writer
                .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
                .unwrap();
        }
    };
    let mut first = None;
    let mut seen = 0;
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            decoder.decode(m.payload().unwrap()).unwrap();
            lineage.0.append_value(m.topic());
            lineage.1.append_value(m.partition());
            lineage.2.append_value(m.offset());
            lineage.3.append_option(m.timestamp().to_millis());
            seen += 1;
            if seen % 1024 == 0 {
                flush(&mut decoder, &mut lineage);
            }
        }
    }
    flush(&mut decoder, &mut lineage);
    writer.close().unwrap();
    n as f64 / first.unwrap().elapsed().as_secs_f64()
}

async fn ferry_stream(root: &Path, pipeline: &Path, n: usize) -> f64 {
    let options = StreamOptions {
        max_records: Some(n as u64),
        until_idle: None,
        quiet: true,
    };
    match ferry::engine::run_any(pipeline, &root.join("operators"), options, false)
        .await
        .unwrap()
    {
        ferry::engine::Finished::Stream(s) => {
            assert_eq!(s.records_in, n as u64);
            n as f64 / s.active.as_secs_f64()
        }
        ferry::engine::Finished::Batch(_) => unreachable!(),
    }
}

fn write(dir: &Path, name: &str, yaml: String) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

fn main() {
    let n = env_usize("FERRY_BENCH_RECORDS", 200_000);
    let embed_rows = env_usize("FERRY_BENCH_EMBED_ROWS", 1000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join("ferry-bench-streams");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let broker = DevBroker::start().unwrap();
    let b = broker.addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1 and 2: pass-through of short JSON records.
    let input = unique("bench-in");
    create_topic(&b, &input, 2);
    let values: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "id": i,
                "text": format!("record {i}: a short review of a product that was fine"),
            }))
            .unwrap()
        })
        .collect();
    let t = Instant::now();
    fill(&b, &input, &values);
    println!(
        "records:                 {n} ({:.1}s to produce)",
        t.elapsed().as_secs_f64()
    );

    let copy = unique("bench-copy");
    create_topic(&b, &copy, 2);
    let plain_kk = plain_loop(&b, &input, n, Some(&copy));
    let plain_consume = plain_loop(&b, &input, n, None);
    let plain_parquet = plain_parquet_loop(&b, &input, n, &work.join("plain.parquet"));

    let out = unique("bench-out");
    create_topic(&b, &out, 2);
    let kk = write(
        &work,
        "kk.yaml",
        format!(
            "name: kk\nsource:\n  kafka:\n    brokers: {b}\n    topics: [{input}]\n    group_id: {g}\n    columns: {{id: int64, text: string}}\nsink:\n  kafka:\n    topic: {out}\n    key: id\n",
            g = unique("ferry-kk")
        ),
    );
    let ferry_kk = rt.block_on(ferry_stream(&root, &kk, n));
    let kp = write(
        &work,
        "kp.yaml",
        format!(
            "name: kp\nsource:\n  kafka:\n    brokers: {b}\n    topics: [{input}]\n    group_id: {g}\n    columns: {{id: int64, text: string}}\nsink:\n  rolling_parquet:\n    dir: {dir}\n",
            g = unique("ferry-kp"),
            dir = work.join("kp-out").display()
        ),
    );
    let ferry_kp = rt.block_on(ferry_stream(&root, &kp, n));
    println!("plain consume+produce:   {plain_kk:.0} records/s");
    println!(
        "ferry kafka->kafka:      {ferry_kk:.0} records/s  (ratio {:.2})",
        ferry_kk / plain_kk
    );
    println!("plain consume only:      {plain_consume:.0} records/s");
    println!(
        "ferry kafka->parquet:    {ferry_kp:.0} records/s  (ratio {:.2})",
        ferry_kp / plain_consume
    );
    println!("plain decode+parquet:    {plain_parquet:.0} records/s");
    println!(
        "ferry kafka->parquet vs plain decode+parquet loop: ratio {:.2}",
        ferry_kp / plain_parquet
    );

    // 3: embeddings, stream vs batch job over the same texts.
    ferry::fetch::fetch("minilm", &root.join("models")).unwrap();
    let texts = bench_texts(&root, &work.join("texts.jsonl"), embed_rows);
    let texts_topic = unique("bench-texts");
    create_topic(&b, &texts_topic, 1);
    let values: Vec<Vec<u8>> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::to_vec(&serde_json::json!({"id": i, "text": t})).unwrap())
        .collect();
    fill(&b, &texts_topic, &values);
    let emb_out = unique("bench-emb");
    create_topic(&b, &emb_out, 1);
    let ke = write(
        &work,
        "ke.yaml",
        format!(
            "name: ke\nsource:\n  kafka:\n    brokers: {b}\n    topics: [{texts_topic}]\n    group_id: {g}\n    columns: {{id: int64, text: string}}\nsteps:\n  - operator: minilm\n    inputs: [text]\n    output: embedding\nsink:\n  kafka:\n    topic: {emb_out}\n    key: id\n",
            g = unique("ferry-ke")
        ),
    );
    let batch = write(
        &work,
        "batch.yaml",
        format!(
            "name: batch\nsource:\n  jsonl:\n    path: {}\nsteps:\n  - operator: minilm\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
            work.join("texts.jsonl").display(),
            work.join("batch-out.parquet").display()
        ),
    );
    // Warm-up (model load, page cache) on the batch path, then one measured run of each.
    rt.block_on(ferry::engine::run_file(
        &batch,
        &root.join("operators"),
        true,
    ))
    .unwrap();
    let batch_summary = rt
        .block_on(ferry::engine::run_file(
            &batch,
            &root.join("operators"),
            true,
        ))
        .unwrap();
    let stream_rps = rt.block_on(ferry_stream(&root, &ke, texts.len()));
    println!("embed texts:             {}", texts.len());
    println!(
        "batch job minilm:        {:.1} rows/s",
        batch_summary.rows_per_sec()
    );
    println!(
        "kafka->minilm->kafka:    {stream_rps:.1} rows/s  (ratio {:.2})",
        stream_rps / batch_summary.rows_per_sec()
    );
    drop(broker);
}
