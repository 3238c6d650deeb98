//! A model checkpoint on disk: one `.safetensors` file, a directory holding
//! `model.safetensors`, or a sharded directory with `model.safetensors.index.json`.
//! Every shard is memory-mapped; tensors are read one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::tensor_file::SafeFile;

/// The single-file weights name transformers writes.
pub const MODEL_FILE: &str = "model.safetensors";
/// The shard index name transformers writes.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A memory-mapped checkpoint (one or more safetensors shards).
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory (or the file's parent).
    pub dir: PathBuf,
    /// The index file, when sharded.
    pub index: Option<PathBuf>,
    shards: Vec<SafeFile>,
    by_name: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file or a model directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
            {
                return Err(Error::Unsupported {
                    path: path.into(),
                    reason: "pickled PyTorch weights are refused; convert them to safetensors"
                        .into(),
                });
            }
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::from_files(dir, None, vec![path.to_path_buf()]);
        }
        if !path.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            let pairs = read_index(&index)?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (_, shard) in &pairs {
                if !files.iter().any(|f| f.ends_with(shard)) {
                    files.push(path.join(shard));
                }
            }
            let ckpt = Self::from_files(path.into(), Some(index.clone()), files)?;
            // Every tensor the index lists must be in the shard it names.
            for (tensor, shard) in &pairs {
                let found = ckpt.by_name.get(tensor).map(|&i| ckpt.shards[i].path());
                if !found.is_some_and(|p| p.ends_with(shard)) {
                    return Err(Error::BadJson {
                        path: index,
                        reason: format!("`{tensor}` is not in shard `{shard}`"),
                    });
                }
            }
            return Ok(ckpt);
        }
        let single = path.join(MODEL_FILE);
        if single.is_file() {
            return Self::from_files(path.into(), None, vec![single]);
        }
        if path.join("pytorch_model.bin").exists() {
            return Err(Error::Unsupported {
                path: path.join("pytorch_model.bin"),
                reason: "pickled PyTorch weights are refused; convert them to safetensors".into(),
            });
        }
        Err(Error::MissingTensor {
            key: format!("{MODEL_FILE} or {INDEX_FILE}"),
            file: Some(path.into()),
        })
    }

    fn from_files(dir: PathBuf, index: Option<PathBuf>, files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut by_name = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let sf = SafeFile::open(f)?;
            for n in sf.names() {
                if by_name.insert(n.clone(), i).is_some() {
                    return Err(Error::BadSafetensors {
                        path: f.clone(),
                        reason: format!("tensor `{n}` is in two shards"),
                    });
                }
            }
            shards.push(sf);
        }
        Ok(Checkpoint {
            dir,
            index,
            shards,
            by_name,
        })
    }

    /// The shards, in index order.
    pub fn shards(&self) -> &[SafeFile] {
        &self.shards
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The shard holding `name`.
    pub fn shard_of(&self, name: &str) -> Result<&SafeFile> {
        let i = self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            key: name.into(),
            file: Some(self.dir.clone()),
        })?;
        Ok(&self.shards[*i])
    }

    /// `(dtype, shape)` of `name`.
    pub fn info(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        self.shard_of(name)?.info(name)
    }

    /// Every tensor's shape.
    pub fn shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.info(&n)?.1)))
            .collect()
    }

    /// Loads `name` in its stored dtype.
    pub fn tensor(&self, name: &str, dev: &Device) -> Result<Tensor> {
        self.shard_of(name)?.tensor(name, dev)
    }
}

/// The shard file names an index lists (deduplicated, in first-seen order).
fn read_index(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_index(&text, path)
}

/// The `(tensor, shard file)` pairs of a `model.safetensors.index.json`'s `weight_map`;
/// `path` is used in messages. Shard names must be plain file names.
pub fn parse_index(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::BadJson {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::BadJson {
            path: path.into(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut pairs = Vec::new();
    for (k, f) in map {
        let f = f.as_str().ok_or_else(|| Error::BadJson {
            path: path.into(),
            reason: format!("`{k}` maps to a non-string"),
        })?;
        if f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::BadJson {
                path: path.into(),
                reason: format!("shard name `{f}` must be a plain file name"),
            });
        }
        pairs.push((k.clone(), f.to_string()));
    }
    if pairs.is_empty() {
        return Err(Error::BadJson {
            path: path.into(),
            reason: "`weight_map` is empty".into(),
        });
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> String {
        parse_index(text, Path::new("model.safetensors.index.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shard_index_errors_name_the_problem() {
        assert!(parse("{").contains("invalid JSON"));
        assert!(parse(r#"{"metadata": {}}"#).contains("weight_map"));
        assert!(parse(r#"{"weight_map": {}}"#).contains("empty"));
        assert!(parse(r#"{"weight_map": {"w": 3}}"#).contains("`w`"));
        for bad in ["../secret.safetensors", "/abs.safetensors", ".hidden", ""] {
            let e = parse(&format!(r#"{{"weight_map": {{"w": "{bad}"}}}}"#));
            assert!(e.contains("plain file name"), "{bad}: {e}");
        }
        let ok = parse_index(
            r#"{"weight_map": {"a": "s1", "b": "s2", "c": "s1"}}"#,
            Path::new("i"),
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
    }

    #[test]
    fn index_listing_a_tensor_missing_from_its_shard_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = candle_core::Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let m = BTreeMap::from([("a".to_string(), t)]);
        crate::tensor_file::save(
            &dir.path().join("s1.safetensors"),
            &m,
            &crate::tensor_file::pt_metadata(),
        )
        .unwrap();
        let index = r#"{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("`b` is not in shard `s1.safetensors`"), "{e}");
    }
}
