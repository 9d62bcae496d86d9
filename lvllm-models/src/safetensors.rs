//! Safetensors checkpoints: one file, or shards listed by `model.safetensors.index.json`.
//!
//! Files are memory-mapped (or borrowed from static bytes for the embedded model)
//! and tensors are zero-copy [`HostTensor`] views looked up by their Hugging Face
//! names. The header is validated when a file is opened: a truncated file, bad
//! JSON, an unknown dtype or an offset past the end is an error naming the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lvllm_tensor::{Backing, DType, HostTensor, Shape};
use serde::Deserialize;

use crate::{Error, Result};

/// Largest header lvllm accepts (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: DType,
    shape: Shape,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// One opened safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    name: String,
    backing: Arc<Backing>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    /// Memory-maps and validates a file.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and mapped privately; lvllm never
        // writes to it. Another process truncating the checkpoint while it is
        // mapped is outside what we can guard against (as for every mmap loader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.display().to_string(), Arc::new(Backing::Mmap(mmap)))
    }

    /// Validates a file held in static memory (the model embedded in the binary).
    pub fn from_static(name: impl Into<String>, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(name.into(), Arc::new(Backing::Static(bytes)))
    }

    fn parse(name: String, backing: Arc<Backing>) -> Result<Self> {
        let bytes = backing.as_bytes();
        let corrupt = |msg: String| Error::Safetensors { file: name.clone(), msg };
        if bytes.len() < 8 {
            return Err(corrupt(format!("file is {} bytes, shorter than the 8-byte header length", bytes.len())));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES || 8 + n > bytes.len() as u64 {
            return Err(corrupt(format!("header length {n} exceeds the file size {}", bytes.len())));
        }
        let data_start = 8 + n as usize;
        let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let data_len = bytes.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (key, value) in header {
            if key == "__metadata__" {
                if let Ok(m) = serde_json::from_value::<HashMap<String, String>>(value) {
                    metadata = m;
                }
                continue;
            }
            let raw: RawInfo =
                serde_json::from_value(value).map_err(|e| corrupt(format!("tensor {key:?}: bad header entry: {e}")))?;
            let dtype = DType::from_safetensors_name(&raw.dtype)
                .ok_or_else(|| corrupt(format!("tensor {key:?}: unsupported dtype {}", raw.dtype)))?;
            let [s, e] = raw.data_offsets;
            let shape = Shape::new(raw.shape);
            let need = dtype.bytes_for(shape.elem_count());
            if s > e || e > data_len {
                return Err(corrupt(format!(
                    "tensor {key:?}: data offsets [{s}, {e}] outside the data area of {data_len} bytes"
                )));
            }
            if e - s != need {
                return Err(corrupt(format!(
                    "tensor {key:?}: {} bytes for {dtype} {shape}, which needs {need}",
                    e - s
                )));
            }
            tensors.insert(key, TensorInfo { dtype, shape, start: data_start + s, end: data_start + e });
        }
        Ok(SafetensorsFile { name, backing, tensors, metadata })
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A zero-copy view of a tensor, if present.
    pub fn get(&self, name: &str) -> Option<Result<HostTensor>> {
        let info = self.tensors.get(name)?;
        Some(
            HostTensor::view(info.dtype, info.shape.clone(), self.backing.clone(), info.start, info.end - info.start)
                .map_err(Error::from),
        )
    }
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

/// How far loading has got: the distinct tensors handed to the model so far,
/// and their bytes as stored, out of the checkpoint's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    /// Tensors loaded.
    pub tensors: usize,
    /// Tensors in the checkpoint.
    pub total_tensors: usize,
    /// Bytes of the loaded tensors.
    pub bytes: u64,
    /// Bytes of all tensors.
    pub total_bytes: u64,
}

/// A progress callback of [`WeightSource::with_progress`].
pub type ProgressFn = std::sync::Arc<dyn Fn(LoadProgress) + Send + Sync>;

struct Progress {
    callback: ProgressFn,
    seen: std::sync::Mutex<(std::collections::HashSet<String>, LoadProgress)>,
}

/// All tensors of a checkpoint, looked up by Hugging Face name.
pub struct WeightSource {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
    progress: Option<Progress>,
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource").field("files", &self.files).field("tensors", &self.by_name.len()).finish()
    }
}

impl WeightSource {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and its shards
    /// when present, else `model.safetensors`, else every `*.safetensors` file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read(&index).map_err(|source| Error::Io { path: index.clone(), source })?;
            let idx: IndexFile = serde_json::from_slice(&text).map_err(|e| Error::Safetensors {
                file: index.display().to_string(),
                msg: format!("invalid index JSON: {e}"),
            })?;
            let mut shards: Vec<&String> = idx.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if paths.is_empty() {
            return Err(Error::Io {
                path: dir.join("model.safetensors"),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors file in the model directory",
                ),
            });
        }
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        Ok(Self::from_files(files))
    }

    /// A source over already opened files. A name present in several files
    /// resolves to the first.
    pub fn from_files(files: Vec<SafetensorsFile>) -> Self {
        let mut by_name = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                by_name.entry(n.to_string()).or_insert(i);
            }
        }
        WeightSource { files, by_name, progress: None }
    }

    /// Calls `callback` each time the model takes a tensor it had not taken yet
    /// (from the loading thread), with the counts so far.
    pub fn with_progress(mut self, callback: ProgressFn) -> Self {
        let (mut total_tensors, mut total_bytes) = (0, 0u64);
        for (name, &i) in &self.by_name {
            if let Some(info) = self.files[i].tensors.get(name) {
                total_tensors += 1;
                total_bytes += (info.end - info.start) as u64;
            }
        }
        let start = LoadProgress { tensors: 0, total_tensors, bytes: 0, total_bytes };
        self.progress = Some(Progress { callback, seen: std::sync::Mutex::new((Default::default(), start)) });
        self
    }

    fn note(&self, name: &str, i: usize) {
        let Some(p) = &self.progress else { return };
        let mut g = p.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !g.0.insert(name.to_string()) {
            return;
        }
        if let Some(info) = self.files[i].tensors.get(name) {
            g.1.tensors += 1;
            g.1.bytes += (info.end - info.start) as u64;
        }
        let now = g.1;
        drop(g);
        (p.callback)(now);
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let missing = || Error::MissingTensor { name: name.to_string(), files: self.file_list() };
        let &i = self.by_name.get(name).ok_or_else(missing)?;
        let t = self.files[i].get(name).ok_or_else(missing)??;
        self.note(name, i);
        Ok(t)
    }

    /// A float tensor by name, checked against the shape the config implies.
    pub fn get_float(&self, name: &str, dims: &[usize]) -> Result<HostTensor> {
        let t = self.get(name)?;
        if t.dims() != dims {
            return Err(Error::TensorShape { name: name.into(), expected: Shape::from(dims), got: t.shape().clone() });
        }
        if !matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32) {
            return Err(Error::TensorDType { name: name.into(), got: t.dtype() });
        }
        Ok(t)
    }

    /// A float tensor converted to f32 (norm weights, small vectors).
    pub fn get_f32(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        Ok(self.get_float(name, dims)?.to_f32_vec()?)
    }
}

/// Serialises tensors into the safetensors format (used by tests and tools).
pub fn serialize(tensors: &[(&str, &HostTensor)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, t) in tensors {
        let len = t.as_bytes().len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": t.dtype().safetensors_name(), "shape": t.dims(), "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    let mut h = serde_json::to_vec(&header).expect("json map serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, t) in tensors {
        out.extend_from_slice(t.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn file(bytes: Vec<u8>) -> Result<SafetensorsFile> {
        SafetensorsFile::from_static("test.safetensors", Box::leak(bytes.into_boxed_slice()))
    }

    #[test]
    fn round_trip_and_lookup() {
        let a = HostTensor::from_slice(&[bf16::ONE, bf16::from_f32(2.0)], [2]).unwrap();
        let b = HostTensor::from_slice(&[1i64, 2, 3], [3]).unwrap();
        let f = file(serialize(&[("a", &a), ("b", &b)])).unwrap();
        let src = WeightSource::from_files(vec![f]);
        assert_eq!(src.get_f32("a", &[2]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(src.get("b").unwrap().to_i64_vec().unwrap(), vec![1, 2, 3]);
        let e = src.get_float("a", &[3]).unwrap_err().to_string();
        assert!(e.contains("\"a\"") && e.contains("[3]"), "{e}");
        let e = src.get_float("b", &[3]).unwrap_err().to_string();
        assert!(e.contains("dtype i64"), "{e}");
        let e = src.get("model.norm.weight").unwrap_err().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("test.safetensors"), "{e}");
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let a = HostTensor::from_slice(&[1f32, 2.0], [2]).unwrap();
        let good = serialize(&[("a", &a)]);
        // Truncated data.
        let e = file(good[..good.len() - 1].to_vec()).unwrap_err().to_string();
        assert!(e.contains("test.safetensors") && e.contains("outside the data area"), "{e}");
        // Too short.
        assert!(file(vec![1, 2, 3]).unwrap_err().to_string().contains("shorter than"));
        // Header length past the end.
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert!(file(bad).unwrap_err().to_string().contains("exceeds the file size"));
        // Bad JSON.
        let mut bad = good.clone();
        bad[8] = b'x';
        assert!(file(bad).unwrap_err().to_string().contains("not valid JSON"));
        // Unknown dtype.
        let h = br#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut bad = (h.len() as u64).to_le_bytes().to_vec();
        bad.extend_from_slice(h);
        bad.extend_from_slice(&[0; 8]);
        assert!(file(bad).unwrap_err().to_string().contains("unsupported dtype F64"));
    }

    #[test]
    fn directory_without_weights_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let e = WeightSource::from_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("no *.safetensors"), "{e}");
    }
}
