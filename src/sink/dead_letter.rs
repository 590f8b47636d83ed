//! The dead-letter sink: stream records that failed, with the reason, to a Kafka topic (the
//! record as it was, the reason and its origin in headers) or a JSON Lines file.

use std::io::Write;
use std::path::PathBuf;

use super::kafka::{self, Producer_};
use crate::source::kafka::Record;
use crate::spec::{DeadLetter, KafkaSource};

/// Where failed records go.
pub enum DeadLetters {
    Kafka { producer: Producer_, topic: String },
    Jsonl { file: std::fs::File, path: PathBuf },
}

impl DeadLetters {
    pub fn open(d: &DeadLetter, source: &KafkaSource) -> Result<Self, String> {
        Ok(match d {
            DeadLetter::Kafka(k) => DeadLetters::Kafka {
                producer: kafka::producer(
                    k.brokers.as_deref().unwrap_or(&source.brokers),
                    &k.properties,
                    None,
                )?,
                topic: k.topic.clone(),
            },
            DeadLetter::Jsonl(f) => {
                if let Some(dir) = f.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&f.path)
                    .map_err(|e| format!("dead letters {}: {e}", f.path.display()))?;
                DeadLetters::Jsonl {
                    file,
                    path: f.path.clone(),
                }
            }
        })
    }

    /// Writes the records and makes them durable.
    pub fn write(&mut self, records: &[(&Record, String)]) -> Result<(), String> {
        match self {
            DeadLetters::Kafka { producer, topic } => {
                for (r, reason) in records {
                    let partition = r.partition.to_string();
                    let offset = r.offset.to_string();
                    let headers = rdkafka::message::OwnedHeaders::new()
                        .insert(rdkafka::message::Header {
                            key: "ferry.error",
                            value: Some(reason.as_bytes()),
                        })
                        .insert(rdkafka::message::Header {
                            key: "ferry.source.topic",
                            value: Some(r.topic.as_bytes()),
                        })
                        .insert(rdkafka::message::Header {
                            key: "ferry.source.partition",
                            value: Some(partition.as_bytes()),
                        })
                        .insert(rdkafka::message::Header {
                            key: "ferry.source.offset",
                            value: Some(offset.as_bytes()),
                        });
                    let mut rec =
                        rdkafka::producer::BaseRecord::<[u8], [u8], usize>::with_opaque_to(
                            topic, 0,
                        )
                        .headers(headers);
                    if let Some(p) = &r.payload {
                        rec = rec.payload(&p[..]);
                    }
                    if let Some(k) = &r.key {
                        rec = rec.key(&k[..]);
                    }
                    kafka::send(producer, rec)?;
                }
                kafka::flush(producer)
            }
            DeadLetters::Jsonl { file, path } => {
                let mut buf = Vec::new();
                for (r, reason) in records {
                    serde_json::to_writer(&mut buf, &kafka::dead_letter_json(r, reason))
                        .expect("JSON values serialize");
                    buf.push(b'\n');
                }
                file.write_all(&buf)
                    .and_then(|_| file.sync_data())
                    .map_err(|e| format!("dead letters {}: {e}", path.display()))
            }
        }
    }
}
