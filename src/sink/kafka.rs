//! Kafka clients: the producer behind the Kafka sink and the dead-letter topic, and the encoding
//! of output rows into records.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::json::writer::LineDelimited;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::{
    Covers, FirstFailure, Offsets, OpenOptions, Output, Settle, next_offsets, topic_partitions,
};
use crate::metrics::metrics;
use crate::source::kafka::{LINEAGE, OFFSET, PARTITION, Record, TOPIC};
use crate::spec::{KafkaSink, SinkFormat};

/// How long to wait for the broker on flushes and transactions before failing the batch.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts acknowledged records per micro-batch (the delivery opaque; 0 = not tracked) and failed
/// deliveries, so a batch is committed only when all its records are acknowledged.
#[derive(Default)]
pub struct DeliveryContext {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    acked: Mutex<std::collections::HashMap<usize, u64>>,
}

impl DeliveryContext {
    /// Records of batch `id` acknowledged so far.
    pub fn acked(&self, id: usize) -> u64 {
        self.acked
            .lock()
            .expect("acks")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    /// Forgets batch `id`.
    pub fn forget(&self, id: usize) {
        self.acked.lock().expect("acks").remove(&id);
    }

    /// The first delivery failure since the last call, with the count.
    pub fn take_failure(&self) -> Option<String> {
        let failed = self.failed.swap(0, Ordering::Relaxed);
        (failed > 0).then(|| {
            let first = self
                .first_error
                .lock()
                .expect("delivery error slot")
                .take()
                .unwrap_or_default();
            format!("{failed} record(s) were not delivered: {first}")
        })
    }
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: usize) {
        match result {
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("delivery error slot");
                first.get_or_insert_with(|| e.to_string());
            }
            Ok(_) if batch != 0 => {
                *self.acked.lock().expect("acks").entry(batch).or_insert(0) += 1;
            }
            Ok(_) => {}
        }
    }
}

pub type Producer_ = BaseProducer<DeliveryContext>;

/// Consumer settings ferry's delivery rests on (it stores and commits offsets itself, after
/// the sink is durable; exactly-once reads only committed transactions): `properties` may not
/// change them.
pub fn consumer_settings(exactly_once: bool) -> Vec<(&'static str, &'static str)> {
    let mut settings = vec![
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
    ];
    if exactly_once {
        settings.push(("isolation.level", "read_committed"));
    }
    settings
}

/// Producer settings ferry's delivery rests on.
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[("enable.idempotence", "true")];

/// Properties that a pipeline field sets (property, the field to use instead).
const FIELD_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "`brokers`"),
    ("group.id", "`group_id`"),
    ("transactional.id", "`delivery: exactly_once`"),
];

/// The entries of `properties` that conflict with what delivery needs (`settings`), or that a
/// pipeline field sets: (property, why).
pub fn conflicting_properties(
    properties: &BTreeMap<String, String>,
    settings: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in properties {
        if let Some((_, want)) = settings.iter().find(|(k, _)| k == key)
            && !value.eq_ignore_ascii_case(want)
        {
            out.push((
                key.clone(),
                format!("ferry's delivery guarantees need {key}={want}; remove this property"),
            ));
        }
        if let Some((_, field)) = FIELD_PROPERTIES.iter().find(|(k, _)| k == key) {
            out.push((
                key.clone(),
                format!("{key} comes from the pipeline: use {field} instead"),
            ));
        }
    }
    out
}

/// An idempotent producer (transactional when `transactional_id` is given).
pub fn producer(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    transactional_id: Option<&str>,
) -> Result<Producer_, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        // Each micro-batch is flushed as soon as it is produced: lingering only adds latency.
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
    }
    for (k, v) in properties {
        config.set(k, v);
    }
    for (k, v) in PRODUCER_SETTINGS {
        config.set(*k, *v);
    }
    let producer: Producer_ = config
        .create_with_context(DeliveryContext::default())
        .map_err(|e| format!("creating the Kafka producer for {brokers}: {e}"))?;
    if transactional_id.is_some() {
        producer
            .init_transactions(BROKER_TIMEOUT)
            .map_err(|e| format!("initialising Kafka transactions on {brokers}: {e}"))?;
    }
    Ok(producer)
}

/// Enqueues one record, waiting for room in the producer's queue when it is full.
pub fn send(
    producer: &Producer_,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
) -> Result<(), String> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                producer.poll(Duration::from_millis(50));
                record = r;
            }
            Err((e, r)) => return Err(format!("producing to topic '{}': {e}", r.topic)),
        }
    }
}

/// Waits until every enqueued record is acknowledged; fails if any was not.
pub fn flush(producer: &Producer_) -> Result<(), String> {
    // rdkafka's `flush` sleeps up to 100 ms between checks; a micro-batch should not wait for
    // that. A zero-timeout flush sends what lingers now; then serve delivery reports until none
    // is in flight.
    let _ = producer.flush(Duration::ZERO);
    let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
    while producer.in_flight_count() > 0 {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "waiting for Kafka acknowledgements: {} record(s) still in flight after {BROKER_TIMEOUT:?}",
                producer.in_flight_count()
            ));
        }
        producer.poll(Duration::from_millis(1));
    }
    match producer.context().take_failure() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Turns output rows into Kafka records for one sink.
pub struct RecordEncoder {
    topic: String,
    key: Option<String>,
    format: SinkFormat,
    value: Option<String>,
    lineage_headers: bool,
}

/// One encoded record.
pub struct Encoded {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl RecordEncoder {
    /// Checks the sink against the output schema at plan time.
    pub fn new(
        sink: &KafkaSink,
        schema: &datafusion::arrow::datatypes::Schema,
    ) -> Result<Self, String> {
        if let Some(k) = &sink.key {
            schema
                .index_of(k)
                .map_err(|_| format!("key: no column '{k}' in the output"))?;
        }
        match (sink.format, &sink.value) {
            (SinkFormat::Raw, None) => {
                return Err(
                    "format raw needs `value: <column>` (a binary or string column)".into(),
                );
            }
            (SinkFormat::Raw, Some(v)) => {
                let f = schema
                    .field_with_name(v)
                    .map_err(|_| format!("value: no column '{v}' in the output"))?;
                if !matches!(
                    f.data_type(),
                    DataType::Binary
                        | DataType::LargeBinary
                        | DataType::BinaryView
                        | DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                ) {
                    return Err(format!(
                        "value: column '{v}' is {}, raw values must be binary or string",
                        f.data_type()
                    ));
                }
            }
            (_, Some(_)) => return Err("value is only for format raw".into()),
            _ => {}
        }
        Ok(RecordEncoder {
            topic: sink.topic.clone(),
            key: sink.key.clone(),
            format: sink.format,
            value: sink.value.clone(),
            lineage_headers: sink.lineage_headers,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Encodes every row of `batch`.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Vec<Encoded>, String> {
        let n = batch.num_rows();
        let values: Vec<Vec<u8>> = match self.format {
            SinkFormat::Json => {
                let payload = without_lineage(batch);
                let mut writer = WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, LineDelimited>(Vec::new());
                writer
                    .write(&payload)
                    .map_err(|e| format!("encoding JSON: {e}"))?;
                writer.finish().map_err(|e| format!("encoding JSON: {e}"))?;
                let buf = writer.into_inner();
                buf.split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect()
            }
            SinkFormat::Ipc => {
                // Plain strings, as every file sink writes them.
                let payload =
                    crate::sink::plain(&without_lineage(batch)).map_err(|e| e.to_string())?;
                (0..n)
                    .map(|i| {
                        let mut w = StreamWriter::try_new(Vec::new(), &payload.schema())
                            .map_err(|e| e.to_string())?;
                        w.write(&payload.slice(i, 1)).map_err(|e| e.to_string())?;
                        w.into_inner().map_err(|e| e.to_string())
                    })
                    .collect::<Result<_, String>>()?
            }
            SinkFormat::Raw => {
                let col = batch
                    .column_by_name(self.value.as_deref().expect("checked at plan time"))
                    .expect("checked at plan time");
                bytes_of(col.as_ref())?
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect()
            }
        };
        if values.len() != n {
            return Err(format!("encoded {} values for {n} rows", values.len()));
        }
        let keys: Vec<Option<Vec<u8>>> = match &self.key {
            None => vec![None; n],
            Some(k) => bytes_of(batch.column_by_name(k).expect("checked").as_ref())?,
        };
        let lineage = if self.lineage_headers {
            match (
                batch.column_by_name(TOPIC),
                batch.column_by_name(PARTITION),
                batch.column_by_name(OFFSET),
            ) {
                (Some(t), Some(p), Some(o)) => Some((
                    ArrayFormatter::try_new(t.as_ref(), &FormatOptions::default())
                        .map_err(|e| e.to_string())?,
                    ArrayFormatter::try_new(p.as_ref(), &FormatOptions::default())
                        .map_err(|e| e.to_string())?,
                    ArrayFormatter::try_new(o.as_ref(), &FormatOptions::default())
                        .map_err(|e| e.to_string())?,
                )),
                _ => None,
            }
        } else {
            None
        };
        Ok(values
            .into_iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (value, key))| Encoded {
                key,
                value,
                headers: match &lineage {
                    Some((t, p, o)) => vec![
                        ("ferry.source.topic", t.value(i).to_string()),
                        ("ferry.source.partition", p.value(i).to_string()),
                        ("ferry.source.offset", o.value(i).to_string()),
                    ],
                    None => vec![],
                },
            })
            .collect())
    }
}

/// Enqueues encoded records on `producer`, tagged with micro-batch `batch` (0: untracked).
pub fn produce(
    producer: &Producer_,
    topic: &str,
    records: &[Encoded],
    batch: usize,
) -> Result<(), String> {
    for r in records {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = BaseRecord::with_opaque_to(topic, batch)
            .payload(&r.value[..])
            .headers(headers);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        send(producer, record)?;
    }
    Ok(())
}

/// Micro-batches a Kafka sink may have unacknowledged while the next ones are processed.
const MAX_IN_FLIGHT: usize = 3;

/// A produced micro-batch waiting for its acknowledgements.
struct InFlight {
    id: usize,
    rows: u64,
    offsets: Offsets,
}

/// The Kafka sink. At-least-once, a micro-batch's offsets are durable once every record of it
/// is acknowledged (up to [`MAX_IN_FLIGHT`] batches are acknowledged while the next ones run);
/// exactly-once, each write is a transaction that commits the batch's offsets with its records.
pub struct KafkaOutput {
    producer: Producer_,
    encoder: RecordEncoder,
    transactional: bool,
    /// Produced, not yet all acknowledged (at-least-once), oldest first.
    in_flight: VecDeque<InFlight>,
    next_batch: usize,
    /// The first failure: nothing is produced or reported durable after it (a batch after a
    /// failed transaction would commit offsets past it).
    failed: FirstFailure,
}

impl KafkaOutput {
    pub fn new(sink: &KafkaSink, schema: &Schema, options: OpenOptions) -> Result<Self, String> {
        let brokers = sink
            .brokers
            .as_deref()
            .or(options.default_brokers.as_deref())
            .ok_or("sink.kafka.brokers: give the brokers (a file source has none to default to)")?;
        let encoder = RecordEncoder::new(sink, schema)?;
        Ok(KafkaOutput {
            producer: producer(
                brokers,
                &sink.properties,
                options.transactional_id.as_deref(),
            )?,
            encoder,
            transactional: options.transactional_id.is_some(),
            in_flight: VecDeque::new(),
            next_batch: 1,
            failed: FirstFailure::default(),
        })
    }

    /// Produces the batch, its offsets and its records in one transaction.
    fn transaction(&self, batches: &[RecordBatch], covers: &Covers<'_>) -> Result<(), String> {
        let producer = &self.producer;
        producer
            .begin_transaction()
            .map_err(|e| format!("beginning a Kafka transaction: {e}"))?;
        let sent = (|| {
            for b in batches {
                produce(producer, self.encoder.topic(), &self.encoder.encode(b)?, 0)?;
            }
            // Delivery errors surface before the offsets join the transaction.
            flush(producer)?;
            if !covers.consumed.is_empty() {
                let group = covers
                    .group
                    .ok_or("the consumer has no group metadata for the transaction")?;
                let tpl = topic_partitions(&next_offsets(&covers.consumed))?;
                producer
                    .send_offsets_to_transaction(&tpl, group, BROKER_TIMEOUT)
                    .map_err(|e| format!("adding offsets to the transaction: {e}"))?;
            }
            producer
                .commit_transaction(BROKER_TIMEOUT)
                .map_err(|e| format!("committing the Kafka transaction: {e}"))
        })();
        match sent {
            Ok(()) => {
                metrics().commits.inc();
                Ok(())
            }
            Err(e) => Err(match producer.abort_transaction(BROKER_TIMEOUT) {
                Ok(()) => format!("{e}; the transaction was aborted"),
                Err(a) => format!(
                    "{e}; aborting the transaction failed too ({a}): the broker aborts it when it times out"
                ),
            }),
        }
    }

    /// Moves the offsets of fully acknowledged batches (oldest first) out of `in_flight`,
    /// waiting until at most `max_in_flight` batches remain unacknowledged. Fails on a failed
    /// delivery.
    fn settle(&mut self, max_in_flight: usize) -> Result<Offsets, String> {
        let mut durable = Offsets::new();
        let deadline = Instant::now() + BROKER_TIMEOUT;
        loop {
            self.producer.poll(Duration::ZERO);
            if let Some(e) = self.producer.context().take_failure() {
                return Err(e);
            }
            while let Some(f) = self.in_flight.front()
                && self.producer.context().acked(f.id) >= f.rows
            {
                let f = self.in_flight.pop_front().expect("front exists");
                self.producer.context().forget(f.id);
                durable.extend(f.offsets);
            }
            if self.in_flight.len() <= max_in_flight {
                return Ok(durable);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "waiting for Kafka acknowledgements: {} batch(es) unacknowledged after {BROKER_TIMEOUT:?}",
                    self.in_flight.len(),
                ));
            }
            self.producer.poll(Duration::from_millis(1));
        }
    }
}

impl Output for KafkaOutput {
    fn write(&mut self, batches: &[RecordBatch], covers: Covers<'_>) -> Result<(), String> {
        self.failed.check("not producing")?;
        if self.transactional {
            let sent = self.transaction(batches, &covers);
            self.failed.record(sent)?;
        } else {
            // Acknowledgements are collected while the next batches run.
            let id = self.next_batch;
            self.next_batch += 1;
            let sent = batches.iter().try_for_each(|b| {
                produce(
                    &self.producer,
                    self.encoder.topic(),
                    &self.encoder.encode(b)?,
                    id,
                )
            });
            self.failed.record(sent)?;
            self.in_flight.push_back(InFlight {
                id,
                rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
                offsets: next_offsets(&covers.consumed),
            });
        }
        Ok(())
    }

    fn durable(&mut self, settle: Settle) -> Result<Offsets, String> {
        self.failed.check("not committing")?;
        let settled = self.settle(match settle {
            Settle::AfterWrite => MAX_IN_FLIGHT,
            Settle::Idle => usize::MAX,
            Settle::All => 0,
        });
        self.failed.record(settled)
    }

    /// Every batch acknowledged (a transaction is flushed when it commits).
    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.durable(Settle::All).map(|_| ())
    }
}

/// Bytes of each value: strings and binary as they are, anything else as its display text.
fn bytes_of(array: &dyn Array) -> Result<Vec<Option<Vec<u8>>>, String> {
    let n = array.len();
    let valid = |i: usize| array.is_valid(i);
    Ok(match array.data_type() {
        DataType::Binary => {
            let a = array.as_binary::<i32>();
            (0..n)
                .map(|i| valid(i).then(|| a.value(i).to_vec()))
                .collect()
        }
        DataType::LargeBinary => {
            let a = array.as_binary::<i64>();
            (0..n)
                .map(|i| valid(i).then(|| a.value(i).to_vec()))
                .collect()
        }
        DataType::BinaryView => {
            let a = array.as_binary_view();
            (0..n)
                .map(|i| valid(i).then(|| a.value(i).to_vec()))
                .collect()
        }
        _ => {
            let f = ArrayFormatter::try_new(array, &FormatOptions::default())
                .map_err(|e| e.to_string())?;
            (0..n)
                .map(|i| valid(i).then(|| f.value(i).to_string().into_bytes()))
                .collect()
        }
    })
}

fn without_lineage(batch: &RecordBatch) -> RecordBatch {
    let keep: Vec<usize> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !LINEAGE.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    batch.project(&keep).expect("indices in range")
}

/// A dead-letter record as the JSON Lines sink writes it.
pub fn dead_letter_json(record: &Record, reason: &str) -> serde_json::Value {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut v = serde_json::json!({
        "reason": reason,
        "topic": &*record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
    });
    let o = v.as_object_mut().expect("object");
    // `name` as text when it is UTF-8, else `<name>_base64`.
    for (name, bytes) in [("key", &record.key), ("payload", &record.payload)] {
        match bytes.as_deref() {
            None => {
                o.insert(name.into(), serde_json::Value::Null);
            }
            Some(b) => match std::str::from_utf8(b) {
                Ok(text) => {
                    o.insert(name.into(), text.into());
                }
                Err(_) => {
                    o.insert(format!("{name}_base64"), b64(b).into());
                }
            },
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{RecordBatch, StringViewArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    /// An IPC record declares plain strings, not DataFusion's view types.
    #[test]
    fn ipc_records_hold_plain_strings() {
        let sink: crate::spec::KafkaSink =
            serde_json::from_value(serde_json::json!({"topic": "t", "format": "ipc"})).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "text",
            DataType::Utf8View,
            true,
        )]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringViewArray::from(vec!["a", "b"]))],
        )
        .unwrap();
        let encoded = super::RecordEncoder::new(&sink, &schema)
            .unwrap()
            .encode(&batch)
            .unwrap();
        assert_eq!(encoded.len(), 2);
        let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
            std::io::Cursor::new(encoded[0].value.clone()),
            None,
        )
        .unwrap();
        assert_eq!(reader.schema().field(0).data_type(), &DataType::Utf8);
    }
}
