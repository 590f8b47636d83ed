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

use super::{Covers, FirstFailure, Offsets, Output, Ranges, Settle, merge_ranges, next_offsets};
use crate::spec::RollingParquetSink;

/// Footer key holding the offsets a file covers: `{"topic": {"partition": [first, last]}}`.
pub const OFFSETS_KEY: &str = "ferry.offsets";

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
    /// Next offsets of the rows written since the last roll: committable once they roll.
    pending: Offsets,
    /// Files renamed into place so far.
    pub files_written: u64,
    /// The first write or roll that failed: from then on nothing is durable and nothing rolls,
    /// so no offset is committed for rows that may not be in a file.
    failed: FirstFailure,
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
            schema: crate::sink::plain_schema(&schema),
            props: cfg.compression.writer_properties(),
            open: HashMap::new(),
            ranges: Ranges::new(),
            seq: 0,
            pending: Offsets::new(),
            files_written: 0,
            failed: FirstFailure::default(),
        })
    }

    /// Writes a micro-batch's output rows, covering the offsets in `consumed`; rolls the files
    /// that are due. The offsets join the next footers only once every row of the batch is
    /// written; after a failure the writer is failed for good.
    fn write_rows(&mut self, batches: &[RecordBatch], consumed: &Ranges) -> Result<(), String> {
        self.failed.check("not writing")?;
        let written = self.append_all(batches);
        self.failed.record(written)?;
        merge_ranges(&mut self.ranges, consumed);
        self.pending.extend(next_offsets(consumed));
        let due = self.open.values().any(|f| {
            f.rows >= self.cfg.max_rows
                || f.writer.bytes_written() + f.writer.in_progress_size()
                    >= self.cfg.max_bytes as usize
        });
        if due {
            self.roll()?;
        }
        Ok(())
    }

    fn append_all(&mut self, batches: &[RecordBatch]) -> Result<(), String> {
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
        Ok(())
    }

    /// Rolls if the oldest open file is older than `max_age`. Returns whether it rolled.
    fn roll_if_old(&mut self) -> Result<bool, String> {
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
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                // The new directory's entry is durable before a file in it is renamed.
                crate::sink::sync_dir(&self.cfg.dir)
                    .map_err(|e| format!("{}: {e}", self.cfg.dir.display()))?;
            }
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
            let file = create_locked(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
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
        let batch = crate::sink::to_plain(batch, &self.schema).map_err(|e| e.to_string())?;
        let f = self.open.get_mut(&value).expect("just opened");
        f.writer
            .write(&batch)
            .map_err(|e| format!("{}: {e}", f.tmp.display()))?;
        f.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes every open file: footer (with the offsets), fsync, rename into place, fsync of
    /// the directory. A failure fails the writer (the files not yet renamed stay temporaries).
    fn roll(&mut self) -> Result<(), String> {
        self.failed.check("not rolling")?;
        let offsets = ranges_json(&self.ranges);
        let mut files = self
            .open
            .drain()
            .map(|(_, f)| f)
            .collect::<Vec<_>>()
            .into_iter();
        while let Some(f) = files.next() {
            let (path, rows) = (f.path.clone(), f.rows);
            if let Err(e) = Self::finish_file(f, &offsets) {
                for rest in files {
                    let _ = std::fs::remove_file(&rest.tmp);
                }
                return self.failed.record(Err(e));
            }
            self.files_written += 1;
            tracing::debug!(file = %path.display(), rows, "rolled");
        }
        self.ranges.clear();
        Ok(())
    }

    fn finish_file(mut f: OpenFile, offsets: &str) -> Result<(), String> {
        let tmp = f.tmp.clone();
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", tmp.display());
        let cleanup = |e: String| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        f.writer
            .append_key_value_metadata(KeyValue::new(OFFSETS_KEY.to_string(), offsets.to_string()));
        let file = f.writer.into_inner().map_err(|e| cleanup(at(&e)))?;
        file.sync_all().map_err(|e| cleanup(at(&e)))?;
        // Renamed while still open and locked, then the directory entry made durable.
        std::fs::rename(&f.tmp, &f.path)
            .map_err(|e| cleanup(format!("{}: {e}", f.path.display())))?;
        let dir = f.path.parent().unwrap_or(Path::new("."));
        crate::sink::sync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        drop(file);
        Ok(())
    }
}

impl Output for RollingWriter {
    fn write(&mut self, batches: &[RecordBatch], covers: Covers<'_>) -> Result<(), String> {
        self.write_rows(batches, &covers.consumed)
    }

    /// The offsets of rows written since the last call once no file holding rows is open
    /// (files roll at `max_rows`, `max_bytes`, `max_age` when idle, and on [`Settle::All`]).
    fn durable(&mut self, settle: Settle) -> Result<Offsets, String> {
        self.failed.check("nothing is durable")?;
        match settle {
            Settle::AfterWrite => {}
            Settle::Idle => {
                self.roll_if_old()?;
            }
            Settle::All if !self.open.is_empty() => self.roll()?,
            Settle::All => {}
        }
        // Offsets are durable once no file holding rows is open.
        Ok(if self.open.is_empty() {
            std::mem::take(&mut self.pending)
        } else {
            Offsets::new()
        })
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.durable(Settle::All).map(|_| ())
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

/// Creates a temporary and locks it. The lock is held until the file is renamed, so that
/// another process (on this host, or on another one sharing the volume) sees the temporary is
/// alive. A cleaner may lock and remove the file between its creation and the lock: the lock
/// is then on a removed file, which is made again.
fn create_locked(tmp: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = File::create(tmp)?;
        file.lock()?;
        match std::fs::metadata(tmp) {
            Ok(m) if m.ino() == file.metadata()?.ino() => return Ok(file),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes temporaries left by writers that no longer run (a crash mid-file): those no
/// process holds a lock on ([`create_locked`]). Process ids are not used: they mean nothing
/// on another host sharing the volume.
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
        if !e.file_name().to_string_lossy().contains(".inprogress-") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if file.try_lock().is_ok() {
            tracing::info!(file = %path.display(), "removing a temporary no writer holds");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The next offset to read per (topic, partition), from the footers of the files in `dir`.
pub fn recorded_next_offsets(dir: &Path) -> Result<Offsets, String> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn sink(dir: &Path) -> RollingParquetSink {
        serde_json::from_value(serde_json::json!({
            "dir": dir, "partition_by": "k", "max_rows": 1000000, "max_age": "1h"
        }))
        .unwrap()
    }

    fn batch(keys: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from_iter_values(0..keys.len() as i64)),
            ],
        )
        .unwrap()
    }

    fn covers(first: i64, last: i64) -> Covers<'static> {
        Covers {
            consumed: Ranges::from([(("t".to_string(), 0), (first, last))]),
            group: None,
        }
    }

    /// Offsets become committable when the files holding their rows roll, not before.
    #[test]
    fn offsets_are_durable_once_their_files_roll() {
        let dir = tempfile::tempdir().unwrap();
        let b = batch(&["a", "b"]);
        let mut w = RollingWriter::new(&sink(dir.path()), b.schema()).unwrap();
        w.write(&[b], covers(0, 1)).unwrap();
        w.write(&[batch(&["a"])], covers(2, 2)).unwrap();
        assert!(w.durable(Settle::AfterWrite).unwrap().is_empty());
        assert!(
            w.durable(Settle::Idle).unwrap().is_empty(),
            "younger than max_age"
        );
        let durable = w.durable(Settle::All).unwrap();
        assert_eq!(durable, Offsets::from([(("t".to_string(), 0), 3)]));
        assert_eq!(recorded_next_offsets(dir.path()).unwrap(), durable);
        assert!(w.durable(Settle::All).unwrap().is_empty(), "reported once");
        Box::new(w).finish().unwrap();
    }

    /// A batch that cannot be written in full leaves its offsets out of every footer, and the
    /// writer rolls nothing more: the rows written before the failure must not become a file
    /// whose footer says the failed batch's records are in it.
    #[test]
    fn offsets_join_footers_only_after_their_rows_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let b = batch(&["a", "a"]);
        let mut w = RollingWriter::new(&sink(dir.path()), b.schema()).unwrap();
        w.write(&[b], covers(0, 1)).unwrap();
        // The directory of the value `b` cannot be made: a file holds its name.
        std::fs::write(dir.path().join("k=b"), b"in the way").unwrap();
        let err = w.write(&[batch(&["a", "b"])], covers(2, 3)).unwrap_err();
        assert!(err.contains("k=b"), "{err}");
        assert!(
            w.durable(Settle::All).is_err(),
            "a failed writer never rolls"
        );
        assert!(w.write(&[batch(&["a"])], covers(4, 4)).is_err());
        assert!(recorded_next_offsets(dir.path()).unwrap().is_empty());
    }

    /// A roll that fails part-way is not durable, and neither is anything after it.
    #[test]
    fn a_failed_roll_is_never_durable_again() {
        let dir = tempfile::tempdir().unwrap();
        let b = batch(&["a", "b"]);
        let mut w = RollingWriter::new(&sink(dir.path()), b.schema()).unwrap();
        w.write(&[b], covers(0, 1)).unwrap();
        // One of the two files cannot be renamed into place.
        std::fs::remove_dir_all(dir.path().join("k=b")).unwrap();
        assert!(w.durable(Settle::All).is_err());
        assert!(w.durable(Settle::All).is_err());
        assert!(w.durable(Settle::Idle).is_err());
        let temporaries = std::fs::read_dir(dir.path().join("k=a"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".inprogress-"))
            .count();
        assert_eq!(temporaries, 0, "the files that did not roll are removed");
    }

    /// Liveness is the writer's lock, not its process id: a temporary locked by a process this
    /// host cannot see (another host on the same volume) is kept; an unlocked one goes.
    #[test]
    fn temporaries_are_removed_only_when_no_writer_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        // Process ids above Linux's maximum: no such process here.
        let live = dir.path().join(".part-1.parquet.inprogress-4194304");
        let crashed = dir.path().join(".part-2.parquet.inprogress-4194305");
        let held = create_locked(&live).unwrap();
        File::create(&crashed).unwrap();
        remove_stale_temporaries(dir.path());
        assert!(live.exists(), "a locked temporary is alive");
        assert!(!crashed.exists(), "an unlocked temporary is left over");
        drop(held);
        remove_stale_temporaries(dir.path());
        assert!(!live.exists());
    }
}
