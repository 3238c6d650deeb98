//! Safetensors files: memory-mapped, validated reading, and atomic writing.
//!
//! Reading goes through the `safetensors` crate's own validation (bounded header, offsets that
//! tile the data exactly, byte lengths that match dtype × shape), and every failure names the
//! file. Writing streams one tensor at a time to a temporary file in the target folder, fsyncs
//! it and renames it into place, so a crash never leaves a partial file under the final name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::error::{Error, Result};

/// A memory-mapped, validated safetensors file.
pub struct SafeFile {
    path: PathBuf,
    mmap: Backing,
    header_len: usize,
    meta: Metadata,
}

impl std::fmt::Debug for SafeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadSafetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// candle's dtype for a safetensors dtype, if candle has one.
pub fn to_candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors dtype name of a candle dtype.
pub fn to_st_dtype(d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        other => {
            return Err(Error::Config(format!(
                "dtype {other:?} cannot be written to safetensors here"
            )))
        }
    })
}

/// The bytes of a safetensors file: memory-mapped, or owned (for data already in memory).
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

impl SafeFile {
    /// Maps and validates `path`. Never opens it for writing.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and we never write through it. A file truncated by
        // another process while mapped would fault; that is the usual mmap contract, the
        // one safetensors and candle also accept.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::validate(path, Backing::Mapped(mmap))
    }

    /// Validates safetensors bytes already in memory; `name` is used in messages.
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::validate(name, Backing::Owned(bytes))
    }

    fn validate(path: &Path, mmap: Backing) -> Result<Self> {
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| bad(path, e.to_string()))?;
        // The crate reads the header into a map, where a repeated key silently wins; refuse it.
        if let Some(dup) = duplicate_key(&mmap[8..8 + header_len]) {
            return Err(bad(
                path,
                format!("tensor `{dup}` is declared twice in the header"),
            ));
        }
        for (name, info) in meta.tensors() {
            if to_candle_dtype(info.dtype).is_none() {
                return Err(bad(
                    path,
                    format!("tensor `{name}` has unsupported dtype {:?}", info.dtype),
                ));
            }
        }
        Ok(SafeFile {
            path: path.to_path_buf(),
            mmap,
            header_len,
            meta,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// `(dtype, shape)` of `name`.
    pub fn info(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        let info = self.meta.info(name).ok_or_else(|| Error::MissingTensor {
            key: name.to_string(),
            file: Some(self.path.clone()),
        })?;
        let dt = to_candle_dtype(info.dtype)
            .ok_or_else(|| bad(&self.path, format!("`{name}`: dtype {:?}", info.dtype)))?;
        Ok((dt, info.shape.clone()))
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.meta.info(name).ok_or_else(|| Error::MissingTensor {
            key: name.to_string(),
            file: Some(self.path.clone()),
        })?;
        let start = 8 + self.header_len;
        let (b, e) = info.data_offsets;
        self.mmap
            .get(start + b..start + e)
            .ok_or_else(|| bad(&self.path, format!("tensor `{name}` lies outside the file")))
    }

    /// Loads `name` onto `dev` in its stored dtype.
    ///
    /// The bytes are copied; a mapped file's pages of them are then handed back to the kernel
    /// (`MADV_DONTNEED`), so that a loaded model is not resident twice (once in the tensors and
    /// once as the mapping's pages, which count in the process's RSS while mapped). A later read
    /// of the same bytes faults them in again from the file.
    pub fn tensor(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let (dt, shape) = self.info(name)?;
        let bytes = self.bytes(name)?;
        let t = Tensor::from_raw_buffer(bytes, dt, &shape, dev)?;
        #[cfg(unix)]
        if let Backing::Mapped(m) = &self.mmap {
            let offset = bytes.as_ptr() as usize - m.as_ptr() as usize;
            // SAFETY: the mapping is a shared, read-only map of a file (`Mmap::map`): dropping
            // its pages loses nothing, and any later read (through another borrow of these
            // bytes too) faults the same bytes in again from the file. Only the RSS changes.
            // Failure (an old kernel) only leaves the pages resident.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len())
            };
        }
        Ok(t)
    }
}

/// The first top-level key that appears twice in a JSON object, if any.
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(k.clone()) {
                    return Ok(Some(k));
                }
            }
            Ok(None)
        }
    }
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(Keys)
        .ok()
        .flatten()
}

/// One tensor to be written: name, dtype, shape.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Entry {
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// A temporary file beside `target` that becomes `target` on [`AtomicFile::commit`] and is
/// removed if dropped before that.
pub struct AtomicFile {
    tmp: PathBuf,
    target: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates the temporary file in `target`'s folder.
    pub fn create(target: &Path) -> Result<Self> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        remove_stale_temps(dir, &name);
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let f = File::create(&tmp).map_err(|e| Error::io(target, e))?;
        Ok(AtomicFile {
            tmp,
            target: target.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, f)),
        })
    }

    /// Writes bytes.
    pub fn write_all(&mut self, b: &[u8]) -> Result<()> {
        let target = self.target.clone();
        self.out
            .as_mut()
            .ok_or_else(|| Error::State("file already committed".into()))?
            .write_all(b)
            .map_err(|e| Error::io(target, e))
    }

    /// Flushes, fsyncs and renames into place.
    pub fn commit(mut self) -> Result<()> {
        let out = self
            .out
            .take()
            .ok_or_else(|| Error::State("file already committed".into()))?;
        let f = out
            .into_inner()
            .map_err(|e| Error::io(&self.target, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.target, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Persist the rename itself; not every filesystem supports syncing a directory.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes `.{name}.<pid>.tmp` files or folders in `dir` left by a writer that was killed
/// (its process no longer exists), so a crash leaves no litter once the next run starts.
pub fn remove_stale_temps(dir: &Path, name: &str) {
    // Liveness is read from /proc; where there is none, leave everything alone.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Writes `text` to `path` atomically.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(text.as_bytes())?;
    f.commit()
}

/// Writes a safetensors file tensor by tensor: `entries` (sorted by name here) fix the header,
/// then `data(entry)` must return exactly that entry's little-endian bytes. Only one tensor's
/// bytes are held at a time. Atomic (temp file, fsync, rename).
pub fn write_streaming(
    path: &Path,
    mut entries: Vec<Entry>,
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<()> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Config(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for e in &entries {
        let n = e.nbytes();
        header.insert(
            e.name.clone(),
            serde_json::json!({
                "dtype": format!("{:?}", to_st_dtype(e.dtype)?),
                "shape": e.shape,
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut h = serde_json::to_string(&header)
        .map_err(|e| Error::Config(e.to_string()))?
        .into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = AtomicFile::create(path)?;
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for e in &entries {
        let bytes = data(e)?;
        if bytes.len() != e.nbytes() {
            return Err(Error::State(format!(
                "{}: tensor `{}` produced {} bytes, header says {}",
                path.display(),
                e.name,
                bytes.len(),
                e.nbytes()
            )));
        }
        f.write_all(&bytes)?;
    }
    f.commit()
}

/// Little-endian bytes of a tensor (any device, contiguous or not).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    fn le<T: Copy>(v: Vec<T>, f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match t.dtype() {
        DType::F32 => le(t.to_vec1::<f32>()?, |x| x.to_le_bytes().to_vec()),
        DType::F16 => le(t.to_vec1::<half::f16>()?, |x| x.to_le_bytes().to_vec()),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, |x| x.to_le_bytes().to_vec()),
        DType::F64 => le(t.to_vec1::<f64>()?, |x| x.to_le_bytes().to_vec()),
        DType::I64 => le(t.to_vec1::<i64>()?, |x| x.to_le_bytes().to_vec()),
        DType::I32 => le(t.to_vec1::<i32>()?, |x| x.to_le_bytes().to_vec()),
        DType::U32 => le(t.to_vec1::<u32>()?, |x| x.to_le_bytes().to_vec()),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(Error::Config(format!(
                "dtype {other:?} cannot be written to safetensors here"
            )))
        }
    })
}

/// Writes named tensors (sorted by name) with `metadata`, atomically.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let entries = tensors
        .iter()
        .map(|(n, t)| Entry {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
        })
        .collect();
    write_streaming(path, entries, metadata, |e| tensor_bytes(&tensors[&e.name]))
}

/// `{"format": "pt"}`, the metadata PEFT and transformers write.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading hands the mapped pages back (`MADV_DONTNEED`); reading the same multi-page
    /// tensors again, as tensors and as bytes, still gives the file's values.
    #[test]
    fn tensors_read_again_after_their_pages_are_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.safetensors");
        let dev = Device::Cpu;
        let vals = |k: u32| {
            (0..40_000u32)
                .map(|i| (i * 7 + k) as f32 * 0.5)
                .collect::<Vec<_>>()
        };
        let m = BTreeMap::from([
            (
                "x".to_string(),
                Tensor::from_vec(vals(1), 40_000, &dev).unwrap(),
            ),
            (
                "y".to_string(),
                Tensor::from_vec(vals(2), 40_000, &dev).unwrap(),
            ),
        ]);
        save(&p, &m, &pt_metadata()).unwrap();
        let f = SafeFile::open(&p).unwrap();
        for _ in 0..2 {
            for (k, want) in [("x", vals(1)), ("y", vals(2))] {
                let got: Vec<f32> = f.tensor(k, &dev).unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{k}");
                let bytes: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(f.bytes(k).unwrap(), bytes.as_slice(), "{k}");
            }
        }
    }

    #[test]
    fn save_then_open_round_trips_bit_for_bit_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let dev = Device::Cpu;
        let mut m = BTreeMap::new();
        m.insert(
            "b".to_string(),
            Tensor::new(&[[1.5f32, -2.0], [3.0, 4.25]], &dev).unwrap(),
        );
        m.insert("a".to_string(), Tensor::new(&[1u8, 2, 3], &dev).unwrap());
        m.insert(
            "c".to_string(),
            Tensor::new(&[0.5f32, 1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        );
        save(&p, &m, &pt_metadata()).unwrap();
        let f = SafeFile::open(&p).unwrap();
        assert_eq!(f.names(), vec!["a", "b", "c"]);
        assert_eq!(f.metadata(), pt_metadata());
        for (k, t) in &m {
            assert_eq!(f.tensor(k, &dev).unwrap().dtype(), t.dtype());
            assert_eq!(f.bytes(k).unwrap(), tensor_bytes(t).unwrap().as_slice());
        }
        // The reference reader agrees.
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[2, 2]);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 1,
            "no temp file left behind"
        );
    }

    #[test]
    fn truncated_and_lying_files_are_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let m = BTreeMap::from([(
            "w".to_string(),
            Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap(),
        )]);
        save(&p, &m, &pt_metadata()).unwrap();
        let good = std::fs::read(&p).unwrap();

        let trunc = dir.path().join("trunc.safetensors");
        std::fs::write(&trunc, &good[..good.len() - 4]).unwrap();
        let e = SafeFile::open(&trunc).unwrap_err().to_string();
        assert!(
            e.contains("trunc.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );

        let lie = dir.path().join("lie.safetensors");
        let text = String::from_utf8_lossy(&good).replace("[0,16]", "[0,32]");
        std::fs::write(&lie, text.as_bytes()).unwrap();
        let e = SafeFile::open(&lie).unwrap_err().to_string();
        assert!(e.contains("lie.safetensors"), "{e}");

        let tiny = dir.path().join("tiny.safetensors");
        std::fs::write(&tiny, b"abc").unwrap();
        assert!(SafeFile::open(&tiny)
            .unwrap_err()
            .to_string()
            .contains("tiny.safetensors"));

        let dup = dir.path().join("dup.safetensors");
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
        let entry = &header[header.find("\"w\"").unwrap()..header.rfind('}').unwrap()];
        let doubled = format!("{},{entry}}}", &header[..header.rfind('}').unwrap()]);
        let mut padded = doubled.into_bytes();
        while padded.len() % 8 != 0 {
            padded.push(b' ');
        }
        let mut bytes = (padded.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&padded);
        bytes.extend_from_slice(&good[8 + n..]);
        std::fs::write(&dup, bytes).unwrap();
        let e = SafeFile::open(&dup).unwrap_err().to_string();
        assert!(
            e.contains("dup.safetensors") && e.contains("`w` is declared twice"),
            "{e}"
        );

        let missing = dir.path().join("missing.safetensors");
        assert!(SafeFile::open(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.safetensors"));
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// A file with `header` as its JSON header and `data` after it.
    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(&h);
        v.extend_from_slice(data);
        v
    }

    fn err(bytes: Vec<u8>) -> String {
        SafeFile::from_bytes(Path::new("x.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn oversized_header_is_refused_before_reading_it() {
        let mut v = (u64::MAX / 2).to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        let e = err(v);
        assert!(
            e.contains("x.safetensors") && e.contains("header too large"),
            "{e}"
        );
    }

    #[test]
    fn declared_bytes_beyond_the_file_are_refused() {
        let e = err(file_with(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        ));
        assert!(
            e.contains("x.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }

    #[test]
    fn overflowing_dimension_products_are_refused() {
        let h = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#;
        let e = err(file_with(h, &[0; 4]));
        assert!(e.contains("x.safetensors") && e.contains("overflow"), "{e}");
    }

    #[test]
    fn unsupported_dtypes_are_named() {
        let e = err(file_with(
            r#"{"w":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ));
        assert!(e.contains("`w`") && e.contains("unsupported dtype"), "{e}");
    }

    #[test]
    fn empty_and_garbage_files_are_refused() {
        assert!(err(vec![]).contains("x.safetensors"));
        assert!(err(file_with("not json", &[])).contains("x.safetensors"));
    }
}
