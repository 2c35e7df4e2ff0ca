//! safetensors I/O: memory-mapped reading and writing.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::{DType, Error, Result, Tensor};

/// A safetensors file mapped into memory. Tensors are copied out one at a time on request.
pub struct SafeTensorsFile {
    path: String,
    mmap: memmap2::Mmap,
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), error: source }
}

impl SafeTensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us is outside our contract,
        // as for every memory-mapped reader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        SafeTensors::deserialize(&mmap)?;
        Ok(SafeTensorsFile { path: path.display().to_string(), mmap })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("header validated in open")
    }

    /// Names of the tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.parsed().names().into_iter().cloned().collect();
        names.sort();
        names
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.parsed().tensor(name).is_ok()
    }

    /// The `__metadata__` map of the header (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Copies tensor `name` out of the file.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.parsed();
        let view = st
            .tensor(name)
            .map_err(|_| Error::MissingTensor { name: name.to_string(), context: format!(" in {}", self.path) })?;
        view_to_tensor(&view, name)
    }
}

fn view_to_tensor(view: &TensorView<'_>, name: &str) -> Result<Tensor> {
    let bytes = view.data();
    let shape = view.shape();
    macro_rules! decode {
        ($t:ty, $n:expr, $f:expr) => {
            Tensor::from_vec::<$t>(bytes.chunks_exact($n).map(|c| $f(c.try_into().unwrap())).collect(), shape)
        };
    }
    match view.dtype() {
        StDtype::F32 => decode!(f32, 4, f32::from_le_bytes),
        StDtype::F64 => decode!(f64, 8, f64::from_le_bytes),
        StDtype::BF16 => decode!(bf16, 2, bf16::from_le_bytes),
        StDtype::F16 => decode!(f16, 2, f16::from_le_bytes),
        StDtype::I64 => decode!(f64, 8, |b| i64::from_le_bytes(b) as f64),
        StDtype::I32 => decode!(f64, 4, |b| i32::from_le_bytes(b) as f64),
        other => Err(Error::Msg(format!("tensor `{name}` has dtype {other:?}, which fla-rs does not read"))),
    }
}

/// Writes `tensors` (name → tensor) and `metadata` to `path` as safetensors.
pub fn save(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bytes: Vec<u8> = match t.dtype() {
            DType::F32 => t.to_vec::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::F64 => t.to_vec::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => t.to_vec::<bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::F16 => t.to_vec::<f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let dt = match t.dtype() {
            DType::F32 => StDtype::F32,
            DType::F64 => StDtype::F64,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
        };
        owned.push((name.clone(), dt, t.shape().to_vec(), bytes));
    }
    let views = owned
        .iter()
        .map(|(n, dt, shape, bytes)| Ok((n.clone(), TensorView::new(*dt, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, &metadata)?;
    std::fs::write(path, data).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_dtypes() {
        let dir = std::env::temp_dir().join(format!("fla-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let base = Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, -1.0], &[2, 3]).unwrap();
        let mut map = BTreeMap::new();
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            map.insert(dt.to_string(), base.to_dtype(dt).unwrap());
        }
        let meta = HashMap::from([("op".to_string(), "gdn".to_string())]);
        save(&map, Some(meta), &path).unwrap();
        let f = SafeTensorsFile::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap()["op"], "gdn");
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = f.tensor(dt.as_str()).unwrap();
            assert_eq!(t.dtype(), dt);
            assert_eq!(t.shape(), &[2, 3]);
            assert_eq!(t.to_vec::<f32>().unwrap(), base.to_vec::<f32>().unwrap());
        }
        assert!(matches!(f.tensor("nope"), Err(Error::MissingTensor { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
