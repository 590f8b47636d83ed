//! The inference cache (opt-in per operator, `cache:` in its manifest): results kept on disk
//! by input, so that a pipeline re-run over a dataset that grew runs the model on the new rows
//! only.
//!
//! An operator's entries live in a directory of their own under the cache root, named after
//! the operator and a hash of everything its outputs depend on: the model directory's files
//! (their contents), the task, the model file, the options and the execution provider. Each
//! call that ran the model on new inputs adds one segment: an Arrow IPC file of `key`
//! (`FixedSizeBinary(16)`, the first 16 bytes of a BLAKE3 hash of the row's argument values in
//! Arrow's row format) and `value` (the operator's output). Segments are written under a
//! temporary name and renamed into place, so readers never see half a segment, and several
//! processes may share a cache (a segment that cannot be read, e.g. after a power cut, is
//! skipped and its rows run again). At start an operator reads the keys of every segment; a hit
//! reads its value from its segment, whose values then stay in memory (bounded) for later hits. Rows that failed are never cached (they fail again, and
//! streams dead-letter them again); a row whose output is null is not cached either.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, FixedSizeBinaryArray, RecordBatch};
use datafusion::arrow::compute::{interleave, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::row::{RowConverter, SortField};
use serde::{Deserialize, Serialize};

use crate::runtime::wheel::write_atomically;

/// Bumped when the key or segment layout changes, so that old entries are not read.
pub const FORMAT: u32 = 1;

/// What an operator's outputs depend on, recorded beside its entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheIdentity {
    pub operator: String,
    pub task: String,
    pub model_dir: PathBuf,
    /// BLAKE3 of the model directory's files ([`model_hash`]).
    pub model_hash: String,
    pub file: String,
    pub provider: String,
    /// The manifest's `options`, as JSON.
    pub options: serde_json::Value,
    pub format: u32,
    /// The Arrow version whose row format the keys hash.
    pub arrow: String,
}

impl CacheIdentity {
    /// The identity of the operator of `manifest`, whose model directory `model_dir` hashes to
    /// `model_hash` ([`model_hash`]).
    pub fn new(manifest: &super::Manifest, model_dir: &Path, model_hash: String) -> Self {
        CacheIdentity {
            operator: manifest.name.clone(),
            task: manifest.task.info().name.to_string(),
            model_dir: model_dir.to_path_buf(),
            model_hash,
            file: manifest.file.clone(),
            provider: format!("{:?}", manifest.provider),
            options: serde_json::to_value(&manifest.options).unwrap_or_default(),
            format: FORMAT,
            arrow: datafusion::arrow::ARROW_VERSION.to_string(),
        }
    }

    /// The identity without where the model is: the same files give the same outputs
    /// wherever they are.
    pub fn without_location(&self) -> Self {
        CacheIdentity {
            model_dir: PathBuf::new(),
            ..self.clone()
        }
    }

    /// The directory name: the operator and the hash of the rest.
    fn dir_name(&self) -> String {
        let json = serde_json::to_vec(&self.without_location()).expect("serializable");
        let hash = blake3::hash(&json).to_hex();
        format!("{}-{}", self.operator, &hash.as_str()[..16])
    }
}

/// BLAKE3 over the regular files directly in a model directory (names, sizes and contents,
/// in name order): the same files give the same hash wherever they are.
pub fn model_hash(dir: &Path) -> std::io::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(&std::fs::metadata(&path)?.len().to_le_bytes());
        hasher.update_reader(File::open(&path)?)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// [`model_hash`] of `dir`, computed the first time and kept in `once`.
pub fn model_hash_once(once: &std::sync::OnceLock<String>, dir: &Path) -> Result<String, String> {
    if let Some(h) = once.get() {
        return Ok(h.clone());
    }
    let h = model_hash(dir).map_err(|e| format!("hashing {}: {e}", dir.display()))?;
    Ok(once.get_or_init(|| h).clone())
}

/// Where a cached value is: (segment, row).
type Slot = (u32, u32);

/// How many bytes of segment values an operator keeps in memory.
pub const VALUES_IN_MEMORY: usize = 256 << 20;

/// An operator's entries.
pub struct InferenceCache {
    dir: PathBuf,
    schema: SchemaRef,
    index: Mutex<Index>,
    /// Value columns of segments read so far, by segment.
    values: Mutex<Values>,
    seq: AtomicU64,
}

#[derive(Default)]
struct Values {
    columns: HashMap<u32, ArrayRef>,
    bytes: usize,
}

#[derive(Default)]
struct Index {
    slots: HashMap<u128, Slot>,
    segments: Vec<PathBuf>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("inference cache {}: {e}", path.display())
}

impl InferenceCache {
    /// Opens (or makes) the operator's directory under `root` and reads the keys of its
    /// segments.
    pub fn open(root: &Path, identity: &CacheIdentity, output: &DataType) -> Result<Self, String> {
        let dir = root.join(identity.dir_name());
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let meta = dir.join("identity.json");
        if !meta.is_file() {
            let json = serde_json::to_vec_pretty(identity).expect("serializable");
            write_atomically(&meta, &json).map_err(|e| e.to_string())?;
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::FixedSizeBinary(16), false),
            Field::new("value", output.clone(), true),
        ]));
        let cache = InferenceCache {
            dir,
            schema,
            index: Mutex::default(),
            values: Mutex::default(),
            seq: AtomicU64::new(0),
        };
        let mut names: Vec<PathBuf> = segments(&cache.dir)?;
        names.sort();
        let mut index = cache.index.lock().expect("cache index");
        for path in names {
            let keys = match read_column(&path, &cache.schema, 0) {
                Ok(batch) => batch,
                Err(e) => {
                    // A segment that cannot be read is left alone (and its rows run again).
                    tracing::warn!(error = %e, "skipping an unreadable inference cache segment");
                    continue;
                }
            };
            let segment = index.segments.len() as u32;
            index.segments.push(path);
            let keys = keys.as_fixed_size_binary();
            for row in 0..keys.len() {
                index
                    .slots
                    .insert(key_of(keys.value(row)), (segment, row as u32));
            }
        }
        drop(index);
        Ok(cache)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.index.lock().expect("cache index").slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each row's key: a hash of its values in every argument.
    pub fn keys(arrays: &[ArrayRef]) -> Result<Vec<u128>, String> {
        let fields = arrays
            .iter()
            .map(|a| SortField::new(a.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields).map_err(|e| e.to_string())?;
        let rows = converter
            .convert_columns(arrays)
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .map(|row| key_of(&blake3::hash(row.as_ref()).as_bytes()[..16]))
            .collect())
    }

    /// Where each key's value is, if cached.
    pub fn lookup(&self, keys: &[u128]) -> Vec<Option<Slot>> {
        let index = self.index.lock().expect("cache index");
        keys.iter().map(|k| index.slots.get(k).copied()).collect()
    }

    /// The values at `slots`, in order. A segment's values are read from disk once and kept
    /// in memory (up to [`VALUES_IN_MEMORY`] bytes, then dropped and read again as needed), so
    /// the micro-batches of a stream do not re-read the same segments.
    pub fn read(&self, slots: &[Slot]) -> Result<ArrayRef, String> {
        let mut needed: Vec<u32> = slots.iter().map(|(s, _)| *s).collect();
        needed.sort_unstable();
        needed.dedup();
        let mut values: Vec<ArrayRef> = Vec::with_capacity(needed.len());
        for &segment in &needed {
            values.push(self.segment_values(segment)?);
        }
        let picks: Vec<(usize, usize)> = slots
            .iter()
            .map(|(s, row)| {
                let place = needed
                    .binary_search(s)
                    .expect("every slot's segment was read");
                (place, *row as usize)
            })
            .collect();
        let refs: Vec<&dyn Array> = values.iter().map(|v| v.as_ref()).collect();
        interleave(&refs, &picks).map_err(|e| e.to_string())
    }

    /// The value column of `segment`, from memory or from its file.
    fn segment_values(&self, segment: u32) -> Result<ArrayRef, String> {
        if let Some(v) = self
            .values
            .lock()
            .expect("cache values")
            .columns
            .get(&segment)
        {
            return Ok(Arc::clone(v));
        }
        let path = self.index.lock().expect("cache index").segments[segment as usize].clone();
        let column = read_column(&path, &self.schema, 1)?;
        let size = column.get_array_memory_size();
        let mut memory = self.values.lock().expect("cache values");
        if memory.bytes + size > VALUES_IN_MEMORY {
            memory.columns.clear();
            memory.bytes = 0;
        }
        if size <= VALUES_IN_MEMORY {
            memory.bytes += size;
            memory.columns.insert(segment, Arc::clone(&column));
        }
        Ok(column)
    }

    /// Adds a segment of `values` (one per key); rows where `keep` is false are left out.
    pub fn store(&self, keys: &[u128], values: &ArrayRef, keep: &[bool]) -> Result<(), String> {
        let rows: Vec<u32> = (0..keys.len())
            .filter(|&i| keep[i] && values.is_valid(i))
            .map(|i| i as u32)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let key_bytes: Vec<[u8; 16]> = rows
            .iter()
            .map(|&i| keys[i as usize].to_le_bytes())
            .collect();
        let key_array =
            FixedSizeBinaryArray::try_from_iter(key_bytes.iter()).map_err(|e| e.to_string())?;
        let indices = datafusion::arrow::array::UInt32Array::from(rows.clone());
        let value_array = take(values.as_ref(), &indices, None).map_err(|e| e.to_string())?;
        let batch = RecordBatch::try_new(
            Arc::clone(&self.schema),
            vec![Arc::new(key_array), value_array],
        )
        .map_err(|e| e.to_string())?;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!(
            "segment-{millis}-{}-{:06}-{}.arrow",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed),
            rows.len()
        );
        let mut w = FileWriter::try_new(Vec::new(), &self.schema).map_err(|e| e.to_string())?;
        w.write(&batch).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
        let bytes = w.into_inner().map_err(|e| e.to_string())?;
        let path = self.dir.join(&name);
        write_atomically(&path, &bytes).map_err(|e| e.to_string())?;
        let mut index = self.index.lock().expect("cache index");
        let segment = index.segments.len() as u32;
        index.segments.push(path);
        for (row, key) in key_bytes.iter().enumerate() {
            index
                .slots
                .insert(u128::from_le_bytes(*key), (segment, row as u32));
        }
        Ok(())
    }
}

fn key_of(bytes: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    u128::from_le_bytes(b)
}

/// The segment files of an operator's directory.
fn segments(dir: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("segment-") && name.ends_with(".arrow")
        })
        .collect())
}

/// Column `column` of a segment, checked against the expected schema.
fn read_column(path: &Path, schema: &Schema, column: usize) -> Result<ArrayRef, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = File::open(path).map_err(io(path))?;
    let reader = FileReader::try_new(file, Some(vec![column])).map_err(|e| at(&e))?;
    let want = schema.field(column).data_type();
    let mut parts = Vec::new();
    for b in reader {
        let b = b.map_err(|e| at(&e))?;
        let got = b.column(0).data_type();
        if b.num_columns() != 1 || got != want {
            return Err(at(&format!(
                "holds {got}, not this operator's output {want}"
            )));
        }
        parts.push(Arc::clone(b.column(0)));
    }
    match parts.len() {
        0 => Ok(datafusion::arrow::array::new_empty_array(want)),
        1 => Ok(parts.swap_remove(0)),
        _ => {
            let refs: Vec<&dyn Array> = parts.iter().map(|p| p.as_ref()).collect();
            datafusion::arrow::compute::concat(&refs).map_err(|e| at(&e))
        }
    }
}

/// One operator directory's figures, for `ferry cache stats`.
#[derive(Debug, Clone)]
pub struct CacheStats {
    pub dir: PathBuf,
    pub identity: Option<CacheIdentity>,
    pub segments: usize,
    pub entries: u64,
    pub bytes: u64,
}

/// Figures of every operator directory under `root`.
pub fn stats(root: &Path) -> Result<Vec<CacheStats>, String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let identity = std::fs::read(dir.join("identity.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let files = segments(&dir)?;
        let mut s = CacheStats {
            dir: dir.clone(),
            identity,
            segments: files.len(),
            entries: 0,
            bytes: 0,
        };
        for f in files {
            s.bytes += std::fs::metadata(&f).map_or(0, |m| m.len());
            // The entry count is the segment name's last part.
            s.entries += f
                .file_stem()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit('-').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        out.push(s);
    }
    Ok(out)
}

/// Removes the entries under `root` (of one operator when `operator` is given). Returns the
/// directories removed.
pub fn clear(root: &Path, operator: Option<&str>) -> Result<Vec<PathBuf>, String> {
    let mut removed = Vec::new();
    for s in stats(root)? {
        let name = s.identity.as_ref().map(|i| i.operator.as_str());
        if operator.is_none() || name == operator {
            std::fs::remove_dir_all(&s.dir).map_err(io(&s.dir))?;
            removed.push(s.dir);
        }
    }
    Ok(removed)
}
