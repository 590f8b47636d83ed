//! Kafka records → Arrow rows: the payload's columns (JSON, Arrow IPC or raw) plus the lineage
//! columns every Kafka source has. A record that cannot be decoded is reported with the reason,
//! never dropped silently, and never stops the others.

use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Array, Int64Array, ListBuilder, StringArray, StructBuilder,
    TimestampMillisecondArray, UInt32Array,
};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::json::ReaderBuilder;
use datafusion::arrow::record_batch::RecordBatch;

use crate::spec::{KafkaSource, PayloadFormat};

/// Lineage column names, appended to every Kafka source row.
pub const TOPIC: &str = "_topic";
pub const PARTITION: &str = "_partition";
pub const OFFSET: &str = "_offset";
pub const TIMESTAMP: &str = "_timestamp";
pub const LINEAGE: [&str; 4] = [TOPIC, PARTITION, OFFSET, TIMESTAMP];

/// One consumed record, owned.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the record has one.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A record that could not be decoded, by its index in the batch.
#[derive(Debug, Clone)]
pub struct BadRecord {
    pub index: usize,
    pub reason: String,
}

/// The lineage columns' fields, in order (what every Kafka source row ends with).
pub fn lineage_fields() -> Vec<Field> {
    vec![
        Field::new(TOPIC, DataType::Utf8, false),
        Field::new(PARTITION, DataType::Int32, false),
        Field::new(OFFSET, DataType::Int64, false),
        Field::new(
            TIMESTAMP,
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]
}

fn header_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(header_fields()),
        true,
    )))
}

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
    ])
}

/// A column type as written in a pipeline (`string`, `int64`, `list<float32>`, or an Arrow
/// type name such as `Utf8` or `Timestamp(ms, "UTC")`).
pub fn parse_type(s: &str) -> Result<DataType, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(inner) = lower
        .strip_prefix("list<")
        .and_then(|r| r.strip_suffix('>'))
    {
        let item = parse_type(inner)?;
        return Ok(DataType::List(Arc::new(Field::new("item", item, true))));
    }
    Ok(match lower.as_str() {
        "string" | "str" | "text" | "utf8" => DataType::Utf8,
        "int" | "int64" | "long" | "bigint" | "integer" => DataType::Int64,
        "int32" => DataType::Int32,
        "int16" => DataType::Int16,
        "int8" => DataType::Int8,
        "uint64" => DataType::UInt64,
        "uint32" => DataType::UInt32,
        "float" | "float32" => DataType::Float32,
        "double" | "float64" | "number" => DataType::Float64,
        "bool" | "boolean" => DataType::Boolean,
        "binary" | "bytes" => DataType::Binary,
        "date" | "date32" => DataType::Date32,
        "timestamp" | "timestamp_ms" => {
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        }
        "timestamp_us" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => DataType::from_str(t).map_err(|_| {
            format!(
                "unknown column type '{t}' (use string, int64, int32, float64, float32, bool, binary, date, timestamp_ms, list<...>, or an Arrow type name)"
            )
        })?,
    })
}

/// Arrow type of one JSON Schema property.
fn json_schema_type(name: &str, prop: &serde_json::Value) -> Result<(DataType, bool), String> {
    let mut nullable = false;
    let ty = match prop.get("type") {
        Some(serde_json::Value::String(t)) => t.clone(),
        Some(serde_json::Value::Array(ts)) => {
            let mut chosen = None;
            for t in ts.iter().filter_map(|t| t.as_str()) {
                if t == "null" {
                    nullable = true;
                } else {
                    chosen = Some(t.to_string());
                }
            }
            chosen.ok_or_else(|| format!("property '{name}': no non-null type"))?
        }
        _ => return Err(format!("property '{name}' has no \"type\"")),
    };
    let dt = match ty.as_str() {
        "string" => match prop.get("format").and_then(|f| f.as_str()) {
            Some("date-time") => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Some("date") => DataType::Date32,
            _ => DataType::Utf8,
        },
        "integer" => DataType::Int64,
        "number" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "array" => {
            let items = prop
                .get("items")
                .ok_or_else(|| format!("array property '{name}' has no \"items\""))?;
            let (item, _) = json_schema_type(&format!("{name}[]"), items)?;
            DataType::List(Arc::new(Field::new("item", item, true)))
        }
        other => {
            return Err(format!(
                "property '{name}': JSON Schema type '{other}' is not supported (string, integer, number, boolean, array)"
            ));
        }
    };
    Ok((dt, nullable))
}

/// Columns from a JSON Schema file: an object schema with `properties`; fields listed in
/// `required` are non-null.
pub fn schema_from_json_schema(path: &Path) -> Result<Vec<Field>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let props = doc
        .get("properties")
        .and_then(|p| p.as_object())
        .ok_or_else(|| format!("{}: no \"properties\" object", path.display()))?;
    let required: Vec<&str> = doc
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut fields = Vec::new();
    for (name, prop) in props {
        let (dt, _) =
            json_schema_type(name, prop).map_err(|e| format!("{}: {e}", path.display()))?;
        fields.push(Field::new(name, dt, !required.contains(&name.as_str())));
    }
    Ok(fields)
}

/// The decoder for a Kafka source, built at plan time.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: PayloadFormat,
    /// The payload's own columns (JSON, IPC) or key/value/headers (raw).
    payload: SchemaRef,
    /// Payload columns + lineage columns: the source table's schema.
    table: SchemaRef,
}

impl Decoder {
    /// Resolves the source's columns; errors say which setting is wrong.
    pub fn new(source: &KafkaSource) -> Result<Self, String> {
        let payload: Vec<Field> = match source.format {
            PayloadFormat::Raw => {
                if source.columns.is_some() || source.schema.is_some() {
                    return Err(
                        "format raw has fixed columns (key, value, headers); remove columns/schema"
                            .to_string(),
                    );
                }
                vec![
                    Field::new("key", DataType::Binary, true),
                    Field::new("value", DataType::Binary, true),
                    Field::new("headers", header_type(), false),
                ]
            }
            PayloadFormat::Json | PayloadFormat::Ipc => match (&source.columns, &source.schema) {
                (Some(_), Some(_)) => {
                    return Err("give either columns or schema, not both".to_string());
                }
                (None, None) => {
                    return Err(format!(
                        "format {} needs its columns: add `columns: {{name: type, ...}}` or `schema: schemas/<file>.json`",
                        if source.format == PayloadFormat::Json {
                            "json"
                        } else {
                            "ipc"
                        }
                    ));
                }
                (Some(cols), None) => {
                    let mut fields = Vec::new();
                    for (name, ty) in &cols.0 {
                        let dt = parse_type(ty).map_err(|e| format!("column '{name}': {e}"))?;
                        fields.push(Field::new(name, dt, true));
                    }
                    fields
                }
                (None, Some(path)) => schema_from_json_schema(path)?,
            },
        };
        for f in &payload {
            if LINEAGE.contains(&f.name().as_str()) {
                return Err(format!(
                    "column '{}' clashes with a lineage column ({})",
                    f.name(),
                    LINEAGE.join(", ")
                ));
            }
        }
        let mut all = payload.clone();
        all.extend(lineage_fields());
        Ok(Decoder {
            format: source.format,
            payload: Arc::new(Schema::new(payload)),
            table: Arc::new(Schema::new(all)),
        })
    }

    /// The source table's schema (payload columns, then lineage).
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.table)
    }

    /// Decodes `records` into one batch; bad records are left out and reported.
    pub fn decode(&self, records: &[Record]) -> (RecordBatch, Vec<BadRecord>) {
        let (payload, rows_of, bad) = match self.format {
            PayloadFormat::Json => self.decode_json(records),
            PayloadFormat::Ipc => self.decode_ipc(records),
            PayloadFormat::Raw => self.decode_raw(records),
        };
        // Lineage per output row, from the record each row came from.
        let topic: StringArray = rows_of.iter().map(|&i| Some(&*records[i].topic)).collect();
        let partition: Int32Array = rows_of.iter().map(|&i| records[i].partition).collect();
        let offset: Int64Array = rows_of.iter().map(|&i| records[i].offset).collect();
        let ts: TimestampMillisecondArray = rows_of
            .iter()
            .map(|&i| records[i].timestamp)
            .collect::<TimestampMillisecondArray>()
            .with_timezone("UTC");
        let mut columns: Vec<ArrayRef> = payload.columns().to_vec();
        columns.extend([
            Arc::new(topic) as ArrayRef,
            Arc::new(partition),
            Arc::new(offset),
            Arc::new(ts),
        ]);
        let batch = RecordBatch::try_new(Arc::clone(&self.table), columns)
            .expect("decoded columns match the table schema");
        (batch, bad)
    }

    fn decode_json(&self, records: &[Record]) -> (RecordBatch, Vec<usize>, Vec<BadRecord>) {
        let mut bad = Vec::new();
        let mut good = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match &r.payload {
                Some(p) if !p.is_empty() => good.push(i),
                _ => bad.push(BadRecord {
                    index: i,
                    reason: "record has no value".to_string(),
                }),
            }
        }
        // Fast path: the whole batch in one decoder.
        if let Ok(batch) = self.json_rows(
            good.len(),
            good.iter().map(|&i| records[i].payload.as_deref().unwrap()),
        ) && batch.num_rows() == good.len()
        {
            return (batch, good, bad);
        }
        // Some record is bad: decode one by one to find which.
        let mut parts = Vec::new();
        let mut rows_of = Vec::new();
        for &i in &good {
            let payload = records[i].payload.as_deref().unwrap();
            match self.json_rows(1, std::iter::once(payload)) {
                Ok(b) if b.num_rows() == 1 => {
                    parts.push(b);
                    rows_of.push(i);
                }
                Ok(b) => bad.push(BadRecord {
                    index: i,
                    reason: format!(
                        "payload holds {} JSON values, expected one object",
                        b.num_rows()
                    ),
                }),
                Err(e) => bad.push(BadRecord {
                    index: i,
                    reason: format!("payload does not match the declared columns: {e}"),
                }),
            }
        }
        bad.sort_by_key(|b| b.index);
        let batch = concat_batches(&self.payload, &parts).expect("same schema");
        (batch, rows_of, bad)
    }

    fn json_rows<'a>(
        &self,
        expected: usize,
        payloads: impl Iterator<Item = &'a [u8]>,
    ) -> Result<RecordBatch, String> {
        // One more than expected, so that a record holding two values shows as an extra row.
        let mut decoder = ReaderBuilder::new(Arc::clone(&self.payload))
            .with_batch_size(expected + 1)
            .build_decoder()
            .map_err(|e| e.to_string())?;
        for p in payloads {
            if std::str::from_utf8(p).is_err() {
                return Err("payload is not UTF-8 text".to_string());
            }
            let mut rest = p;
            while !rest.is_empty() {
                let n = decoder.decode(rest).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                rest = &rest[n..];
            }
            // Separate records, so that `{"a":1}{"b":2}` split over two records is two rows.
            decoder.decode(b"\n").map_err(|e| e.to_string())?;
        }
        Ok(decoder
            .flush()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| RecordBatch::new_empty(Arc::clone(&self.payload))))
    }

    fn decode_ipc(&self, records: &[Record]) -> (RecordBatch, Vec<usize>, Vec<BadRecord>) {
        let mut bad = Vec::new();
        let mut parts = Vec::new();
        let mut rows_of = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let Some(p) = r.payload.as_deref().filter(|p| !p.is_empty()) else {
                bad.push(BadRecord {
                    index: i,
                    reason: "record has no value".to_string(),
                });
                continue;
            };
            match self.ipc_rows(p) {
                Ok(b) => {
                    rows_of.extend(std::iter::repeat_n(i, b.num_rows()));
                    parts.push(b);
                }
                Err(reason) => bad.push(BadRecord { index: i, reason }),
            }
        }
        let batch = concat_batches(&self.payload, &parts).expect("same schema");
        (batch, rows_of, bad)
    }

    fn ipc_rows(&self, payload: &[u8]) -> Result<RecordBatch, String> {
        let reader = StreamReader::try_new(Cursor::new(payload), None)
            .map_err(|e| format!("payload is not an Arrow IPC stream: {e}"))?;
        let got = reader.schema();
        // Columns are matched by name; extra columns are dropped, missing nullable ones are null.
        let mut take = Vec::new();
        for want in self.payload.fields() {
            match got.index_of(want.name()) {
                Ok(j) if got.field(j).data_type() == want.data_type() => take.push(Some(j)),
                Ok(j) => {
                    return Err(format!(
                        "column '{}' is {} in the payload, declared {}",
                        want.name(),
                        got.field(j).data_type(),
                        want.data_type()
                    ));
                }
                Err(_) if want.is_nullable() => take.push(None),
                Err(_) => return Err(format!("payload has no column '{}'", want.name())),
            }
        }
        let mut parts = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| format!("reading the Arrow IPC stream: {e}"))?;
            let columns = take
                .iter()
                .zip(self.payload.fields())
                .map(|(j, f)| match j {
                    Some(j) => Arc::clone(batch.column(*j)),
                    None => {
                        datafusion::arrow::array::new_null_array(f.data_type(), batch.num_rows())
                    }
                })
                .collect();
            parts.push(
                RecordBatch::try_new(Arc::clone(&self.payload), columns)
                    .map_err(|e| e.to_string())?,
            );
        }
        concat_batches(&self.payload, &parts).map_err(|e| e.to_string())
    }

    fn decode_raw(&self, records: &[Record]) -> (RecordBatch, Vec<usize>, Vec<BadRecord>) {
        let mut key = BinaryBuilder::new();
        let mut value = BinaryBuilder::new();
        let mut headers = ListBuilder::new(StructBuilder::from_fields(header_fields(), 0));
        for r in records {
            key.append_option(r.key.as_deref());
            value.append_option(r.payload.as_deref());
            let s = headers.values();
            for (k, v) in &r.headers {
                s.field_builder::<datafusion::arrow::array::StringBuilder>(0)
                    .expect("key field")
                    .append_value(k);
                s.field_builder::<BinaryBuilder>(1)
                    .expect("value field")
                    .append_option(v.as_deref());
                s.append(true);
            }
            headers.append(true);
        }
        let batch = RecordBatch::try_new(
            Arc::clone(&self.payload),
            vec![
                Arc::new(key.finish()),
                Arc::new(value.finish()),
                Arc::new(headers.finish()),
            ],
        )
        .expect("raw columns match");
        (batch, (0..records.len()).collect(), Vec::new())
    }
}

/// Rows of `batch` except those at `drop` (sorted or not).
pub fn without_rows(batch: &RecordBatch, drop: &std::collections::HashSet<usize>) -> RecordBatch {
    if drop.is_empty() {
        return batch.clone();
    }
    let keep: UInt32Array = (0..batch.num_rows() as u32)
        .filter(|i| !drop.contains(&(*i as usize)))
        .collect();
    take_record_batch(batch, &keep).expect("indices in range")
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;

    fn record(offset: i64, payload: &[u8]) -> Record {
        Record {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            timestamp: Some(1_700_000_000_000),
            key: None,
            payload: Some(payload.to_vec()),
            headers: vec![],
        }
    }

    fn json_source(columns: &str) -> KafkaSource {
        crate::spec::yaml::from_str(&format!(
            "{{brokers: x, topics: [t], group_id: g, format: json, columns: {columns}}}"
        ))
        .unwrap()
    }

    #[test]
    fn json_bad_records_are_isolated_and_named() {
        let d = Decoder::new(&json_source("{id: int64, text: string}")).unwrap();
        let records = vec![
            record(10, br#"{"id": 1, "text": "a"}"#),
            record(11, b"not json"),
            record(12, br#"{"id": "x", "text": "b"}"#),
            record(13, br#"{"id": 4, "text": "d", "extra": true}"#),
            record(14, b"\xff\xfe"),
        ];
        let (batch, bad) = d.decode(&records);
        assert_eq!(batch.num_rows(), 2);
        let offsets = batch
            .column_by_name(OFFSET)
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(offsets.values(), &[10, 13]);
        let idx: Vec<usize> = bad.iter().map(|b| b.index).collect();
        assert_eq!(idx, vec![1, 2, 4]);
        assert!(bad[2].reason.contains("UTF-8"), "{}", bad[2].reason);
    }

    #[test]
    fn ipc_payloads_match_columns_by_name() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        use datafusion::arrow::ipc::writer::StreamWriter;
        let src: KafkaSource = crate::spec::yaml::from_str(
            "{brokers: x, topics: [t], group_id: g, format: ipc, columns: {id: int64, text: string}}",
        )
        .unwrap();
        let d = Decoder::new(&src).unwrap();
        let ipc = |batch: RecordBatch| {
            let mut w = StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.into_inner().unwrap()
        };
        // Two rows, columns in another order plus an extra one.
        let good = RecordBatch::try_from_iter(vec![
            (
                "text",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("extra", Arc::new(Int64Array::from(vec![7, 8]))),
            ("id", Arc::new(Int64Array::from(vec![1, 2]))),
        ])
        .unwrap();
        let wrong = RecordBatch::try_from_iter(vec![(
            "id",
            Arc::new(StringArray::from(vec!["x"])) as ArrayRef,
        )])
        .unwrap();
        let records = vec![
            record(0, &ipc(good)),
            record(1, &ipc(wrong)),
            record(2, b"junk"),
        ];
        let (batch, bad) = d.decode(&records);
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema().field(0).name(), "id");
        let offsets = batch
            .column_by_name(OFFSET)
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(offsets.values(), &[0, 0], "both rows come from record 0");
        assert_eq!(bad.len(), 2);
        assert!(
            bad[0].reason.contains("column 'id' is Utf8"),
            "{}",
            bad[0].reason
        );
        assert!(
            bad[1].reason.contains("not an Arrow IPC stream"),
            "{}",
            bad[1].reason
        );
    }

    #[test]
    fn types_parse() {
        assert!(
            matches!(parse_type("list<float32>").unwrap(), DataType::List(f) if f.data_type() == &DataType::Float32)
        );
        assert_eq!(parse_type("Int16").unwrap(), DataType::Int16);
        assert!(
            parse_type("strnig")
                .unwrap_err()
                .contains("unknown column type")
        );
    }
}
