//! The adapters `lora serve` knows (name → folder) and an LRU of the loaded ones. A request for
//! an adapter that is not loaded loads it on a blocking thread while the lock is free, so
//! requests for other adapters (and the batch) never wait on it; concurrent requests for the
//! same adapter share one load.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;
use lora::models::{Llama, ServeAdapter};
use lora::Adapter;
use tokio::sync::OnceCell;

/// Why an adapter could not be had.
#[derive(Debug)]
pub enum AdapterError {
    /// No adapter of that name is registered.
    Unknown,
    /// Loading or preparing it failed (the message names the file or module).
    Load(String),
}

type Slot = Arc<OnceCell<Arc<ServeAdapter>>>;

#[derive(Default)]
struct Inner {
    /// Registered adapters, by name.
    paths: BTreeMap<String, PathBuf>,
    /// Loaded (or loading) adapters.
    loaded: HashMap<String, Slot>,
    /// Names in `loaded`, least recently used first.
    order: VecDeque<String>,
}

/// The registry and its LRU of at most `max_loaded` loaded adapters.
pub struct Adapters {
    model: Arc<Llama>,
    max_loaded: usize,
    inner: Mutex<Inner>,
}

/// Loads the adapter folder `path` and prepares it for batched serving on `model`.
fn load(model: &Llama, path: &Path) -> Result<ServeAdapter, String> {
    let a = Adapter::load(path, &Device::Cpu).map_err(|e| format!("{}: {e}", path.display()))?;
    model
        .serve_adapter(&a)
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl Adapters {
    /// A registry of `paths` (nothing loaded yet).
    pub fn new(model: Arc<Llama>, paths: BTreeMap<String, PathBuf>, max_loaded: usize) -> Self {
        Adapters {
            model,
            max_loaded: max_loaded.max(1),
            inner: Mutex::new(Inner {
                paths,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock guards plain maps that are never left half-updated: a panic elsewhere
        // does not make them wrong.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registered names and folders.
    pub fn list(&self) -> Vec<(String, PathBuf)> {
        self.lock()
            .paths
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Names currently loaded, least recently used first.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().order.iter().cloned().collect()
    }

    /// Marks `name` most recently used, evicting the least recently used beyond the limit
    /// (sequences running with an evicted adapter keep their own reference).
    fn touch(&self, inner: &mut Inner, name: &str, slot: Slot) {
        inner.order.retain(|n| n != name);
        inner.order.push_back(name.to_string());
        inner.loaded.insert(name.to_string(), slot);
        while inner.order.len() > self.max_loaded {
            if let Some(old) = inner.order.pop_front() {
                inner.loaded.remove(&old);
            }
        }
    }

    /// The adapter `name`, loading it first when it is not in the LRU.
    pub async fn get(&self, name: &str) -> Result<Arc<ServeAdapter>, AdapterError> {
        let (slot, path) = {
            let mut inner = self.lock();
            let path = inner
                .paths
                .get(name)
                .cloned()
                .ok_or(AdapterError::Unknown)?;
            let slot = inner.loaded.get(name).cloned().unwrap_or_default();
            self.touch(&mut inner, name, slot.clone());
            (slot, path)
        };
        let model = self.model.clone();
        slot.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || load(&model, &path))
                .await
                .map_err(|e| format!("loading the adapter: {e}"))?
                .map(Arc::new)
        })
        .await
        .cloned()
        .map_err(AdapterError::Load)
    }

    /// Registers and loads `name` from `path` (vLLM's `load_lora_adapter`). Errors when the
    /// name is taken or the adapter does not load or fit.
    pub async fn add(&self, name: &str, path: PathBuf) -> Result<(), String> {
        if self.lock().paths.contains_key(name) {
            return Err(format!("the adapter `{name}` is already loaded"));
        }
        let model = self.model.clone();
        let p = path.clone();
        let a = tokio::task::spawn_blocking(move || load(&model, &p))
            .await
            .map_err(|e| format!("loading the adapter: {e}"))??;
        let mut inner = self.lock();
        if inner.paths.contains_key(name) {
            return Err(format!("the adapter `{name}` is already loaded"));
        }
        inner.paths.insert(name.to_string(), path);
        let slot: Slot = Arc::new(OnceCell::new_with(Some(Arc::new(a))));
        self.touch(&mut inner, name, slot);
        Ok(())
    }

    /// Forgets `name` (running sequences finish with it); false when it was not registered.
    pub fn remove(&self, name: &str) -> bool {
        let mut inner = self.lock();
        inner.order.retain(|n| n != name);
        inner.loaded.remove(name);
        inner.paths.remove(name).is_some()
    }
}
