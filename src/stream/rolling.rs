//! Parquet files rolled in a directory. A file is written under a temporary name and renamed
//! into place when it rolls; its footer records the Kafka offset ranges it covers
//! (`ferry.offsets`), so that an exactly-once pipeline resumes from the files themselves.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};

use crate::spec::RollingParquetSink;

/// Footer key holding the offsets a file covers: `{"topic": {"partition": [first, last]}}`.
pub const OFFSETS_KEY: &str = "ferry.offsets";

/// Offset ranges per (topic, partition): first and last offset consumed, inclusive.
pub type Ranges = BTreeMap<(String, i32), (i64, i64)>;

/// Merges `more` into `ranges`.
pub fn merge_ranges(ranges: &mut Ranges, more: &Ranges) {
    for (tp, &(first, last)) in more {
        ranges
            .entry(tp.clone())
            .and_modify(|r| {
                r.0 = r.0.min(first);
                r.1 = r.1.max(last);
            })
            .or_insert((first, last));
    }
}

fn ranges_json(ranges: &Ranges) -> String {
    let mut out: BTreeMap<&str, BTreeMap<String, [i64; 2]>> = BTreeMap::new();
    for ((t, p), (first, last)) in ranges {
        out.entry(t)
            .or_default()
            .insert(p.to_string(), [*first, *last]);
    }
    serde_json::to_string(&out).expect("serializable")
}

fn parse_ranges(s: &str) -> Option<Ranges> {
    let v: BTreeMap<String, BTreeMap<String, [i64; 2]>> = serde_json::from_str(s).ok()?;
    let mut out = Ranges::new();
    for (t, parts) in v {
        for (p, [first, last]) in parts {
            out.insert((t.clone(), p.parse().ok()?), (first, last));
        }
    }
    Some(out)
}

struct OpenFile {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    rows: u64,
    opened: Instant,
}

/// The rolling writer.
pub struct RollingWriter {
    cfg: RollingParquetSink,
    max_age: Duration,
    schema: SchemaRef,
    props: WriterProperties,
    open: HashMap<String, OpenFile>,
    /// Offsets consumed since the last roll (they go into the footers of the next roll).
    ranges: Ranges,
    seq: u64,
    /// Files renamed into place so far.
    pub files_written: u64,
}

impl RollingWriter {
    pub fn new(cfg: &RollingParquetSink, schema: SchemaRef) -> Result<Self, String> {
        let max_age = humantime::parse_duration(&cfg.max_age)
            .map_err(|e| format!("max_age '{}': {e}", cfg.max_age))?;
        if let Some(col) = &cfg.partition_by
            && schema.index_of(col).is_err()
        {
            return Err(format!("partition_by: no column '{col}' in the output"));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        remove_stale_temporaries(&cfg.dir);
        Ok(RollingWriter {
            cfg: cfg.clone(),
            max_age,
            schema,
            props: cfg.compression.writer_properties(),
            open: HashMap::new(),
            ranges: Ranges::new(),
            seq: 0,
            files_written: 0,
        })
    }

    /// Writes a micro-batch's output rows, covering the offsets in `consumed`; rolls the files
    /// that are due. Returns whether everything consumed so far is in renamed files.
    pub fn write(&mut self, batches: &[RecordBatch], consumed: &Ranges) -> Result<bool, String> {
        merge_ranges(&mut self.ranges, consumed);
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            match &self.cfg.partition_by {
                None => self.append(String::new(), batch)?,
                Some(col) => {
                    for (value, part) in split_by(batch, col)? {
                        self.append(value, &part)?;
                    }
                }
            }
        }
        let due = self.open.values().any(|f| {
            f.rows >= self.cfg.max_rows
                || f.writer.bytes_written() + f.writer.in_progress_size()
                    >= self.cfg.max_bytes as usize
        });
        if due {
            self.roll()?;
        }
        Ok(self.durable())
    }

    /// Whether no consumed offset waits for a file to roll.
    pub fn durable(&self) -> bool {
        self.open.is_empty()
    }

    /// Rolls if the oldest open file is older than `max_age`. Returns whether it rolled.
    pub fn roll_if_old(&mut self) -> Result<bool, String> {
        if self
            .open
            .values()
            .any(|f| f.opened.elapsed() >= self.max_age)
        {
            self.roll()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn append(&mut self, value: String, batch: &RecordBatch) -> Result<(), String> {
        if !self.open.contains_key(&value) {
            let dir = match &self.cfg.partition_by {
                None => self.cfg.dir.clone(),
                Some(col) => self.cfg.dir.join(format!("{col}={}", sanitize(&value))),
            };
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            self.seq += 1;
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let name = format!(
                "part-{millis}-{}-{:05}.parquet",
                std::process::id(),
                self.seq
            );
            let tmp = dir.join(format!(".{name}.inprogress-{}", std::process::id()));
            let file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            self.open.insert(
                value.clone(),
                OpenFile {
                    writer,
                    tmp,
                    path: dir.join(name),
                    rows: 0,
                    opened: Instant::now(),
                },
            );
        }
        let f = self.open.get_mut(&value).expect("just opened");
        f.writer
            .write(batch)
            .map_err(|e| format!("{}: {e}", f.tmp.display()))?;
        f.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes every open file: footer (with the offsets), fsync, rename into place.
    pub fn roll(&mut self) -> Result<(), String> {
        let offsets = ranges_json(&self.ranges);
        for (_, mut f) in self.open.drain() {
            f.writer
                .append_key_value_metadata(KeyValue::new(OFFSETS_KEY.to_string(), offsets.clone()));
            let file = f
                .writer
                .into_inner()
                .map_err(|e| format!("{}: {e}", f.tmp.display()))?;
            file.sync_all()
                .map_err(|e| format!("{}: {e}", f.tmp.display()))?;
            drop(file);
            std::fs::rename(&f.tmp, &f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
            if let Some(dir) = f.path.parent()
                && let Ok(d) = File::open(dir)
            {
                let _ = d.sync_all();
            }
            self.files_written += 1;
            tracing::debug!(file = %f.path.display(), rows = f.rows, "rolled");
        }
        self.ranges.clear();
        Ok(())
    }
}

impl Drop for RollingWriter {
    fn drop(&mut self) {
        for f in self.open.values() {
            let _ = std::fs::remove_file(&f.tmp);
        }
    }
}

fn sanitize(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Splits a batch by the display value of `col` (null → `__null__`).
fn split_by(batch: &RecordBatch, col: &str) -> Result<Vec<(String, RecordBatch)>, String> {
    let array = batch
        .column_by_name(col)
        .ok_or_else(|| format!("partition_by: no column '{col}'"))?;
    let fmt = ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default())
        .map_err(|e| e.to_string())?;
    let mut groups: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        let v = if array.is_null(i) {
            "__null__".to_string()
        } else {
            fmt.value(i).to_string()
        };
        groups
            .entry(v)
            .or_insert_with(|| vec![false; batch.num_rows()])[i] = true;
    }
    groups
        .into_iter()
        .map(|(v, mask)| {
            let mask = datafusion::arrow::array::BooleanArray::from(mask);
            filter_record_batch(batch, &mask)
                .map(|b| (v, b))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Removes temporaries left by processes that no longer run (a crash mid-file).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            remove_stale_temporaries(&path);
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.rsplit_once(".inprogress-").map(|(_, p)| p)
            && let Ok(pid) = pid.parse::<u32>()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The next offset to read per (topic, partition), from the footers of the files in `dir`.
pub fn recorded_next_offsets(dir: &Path) -> Result<BTreeMap<(String, i32), i64>, String> {
    let mut next = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".parquet") {
                continue;
            }
            let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let reader =
                SerializedFileReader::new(file).map_err(|e| format!("{}: {e}", path.display()))?;
            let kv = reader.metadata().file_metadata().key_value_metadata();
            let Some(value) = kv
                .and_then(|kv| kv.iter().find(|k| k.key == OFFSETS_KEY))
                .and_then(|k| k.value.as_deref())
            else {
                continue;
            };
            let ranges = parse_ranges(value)
                .ok_or_else(|| format!("{}: unreadable {OFFSETS_KEY} metadata", path.display()))?;
            for (tp, (_, last)) in ranges {
                let e = next.entry(tp).or_insert(0);
                *e = (*e).max(last + 1);
            }
        }
    }
    Ok(next)
}
