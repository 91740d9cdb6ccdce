//! A restricted reader of the files `torch.save` writes (the zip format, pickle protocol 2).
//!
//! A pickle is a program: loading one with Python's `pickle` runs any function it names. This
//! reader is a small pickle machine of its own that knows only the opcodes `torch.save` and
//! plain metadata pickles use, and only the globals that rebuild tensors and plain containers
//! (`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! `collections.OrderedDict`, the typed storage classes, the dtype constants, and
//! `_codecs.encode(s, 'latin1')` / `builtins.bytes()`, which protocol 2 uses for `bytes`). Any other
//! global is refused at the `GLOBAL` opcode that names it, before anything is built; nothing is
//! ever called. Allowed `REDUCE`s are evaluated on the spot into typed values (a tensor
//! reference, an empty dict): no callable survives them.
//!
//! Everything is bounded: the pickle's size (its zip entry, at most the file's size), string
//! lengths (at most what is left of the pickle), the number of objects, memo entries and stack
//! entries, nesting depth, the number of values produced when the object graph is turned into a
//! tree (a pickle that refers to one list twice from each of forty nested lists is
//! `2^40` values: refused), element counts (checked arithmetic, at most 2^56 per tensor), and the
//! bytes of tensor data produced. Storages are read from their zip entries, only when the entry's
//! size is exactly the storage's, only STORED (uncompressed: `torch.save` never compresses), and
//! tensors must be contiguous views inside them. Zip entry names are looked up, never used as
//! paths.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::format::Dtype;

/// Largest `data.pkl` read (a state dict's pickle is ~100 bytes per tensor).
const MAX_PICKLE: u64 = 256 << 20;
/// Most objects (containers, strings, tensors …) one pickle may create.
const MAX_OBJECTS: usize = 1 << 24;
/// Most entries on the stack, and most memo entries.
const MAX_STACK: usize = 1 << 24;
/// Deepest nesting of containers in the value produced.
pub const MAX_DEPTH: usize = 64;
/// Longest global name (module or attribute) and storage key.
const MAX_NAME: usize = 1024;
/// The largest element count of one tensor (as xpm's own format).
const MAX_NUMEL: u64 = 1 << 56;

/// An element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDtype::F64 | TorchDtype::I64 => 8,
            TorchDtype::F32 | TorchDtype::I32 => 4,
            TorchDtype::F16 | TorchDtype::BF16 | TorchDtype::I16 => 2,
            TorchDtype::I8 | TorchDtype::U8 | TorchDtype::Bool => 1,
        }
    }

    /// torch's name (`torch.float32` …).
    pub fn torch_name(self) -> &'static str {
        match self {
            TorchDtype::F64 => "torch.float64",
            TorchDtype::F32 => "torch.float32",
            TorchDtype::F16 => "torch.float16",
            TorchDtype::BF16 => "torch.bfloat16",
            TorchDtype::I64 => "torch.int64",
            TorchDtype::I32 => "torch.int32",
            TorchDtype::I16 => "torch.int16",
            TorchDtype::I8 => "torch.int8",
            TorchDtype::U8 => "torch.uint8",
            TorchDtype::Bool => "torch.bool",
        }
    }

    /// The xpm dtype holding the same values, for the float types xpm stores.
    pub fn to_xpm(self) -> Option<Dtype> {
        match self {
            TorchDtype::F32 => Some(Dtype::F32),
            TorchDtype::F16 => Some(Dtype::F16),
            TorchDtype::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }

    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => TorchDtype::F32,
            "DoubleStorage" => TorchDtype::F64,
            "HalfStorage" => TorchDtype::F16,
            "BFloat16Storage" => TorchDtype::BF16,
            "LongStorage" => TorchDtype::I64,
            "IntStorage" => TorchDtype::I32,
            "ShortStorage" => TorchDtype::I16,
            "CharStorage" => TorchDtype::I8,
            "ByteStorage" => TorchDtype::U8,
            "BoolStorage" => TorchDtype::Bool,
            _ => return None,
        })
    }

    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" => TorchDtype::F64,
            "float32" => TorchDtype::F32,
            "float16" => TorchDtype::F16,
            "bfloat16" => TorchDtype::BF16,
            "int64" => TorchDtype::I64,
            "int32" => TorchDtype::I32,
            "int16" => TorchDtype::I16,
            "int8" => TorchDtype::I8,
            "uint8" => TorchDtype::U8,
            "bool" => TorchDtype::Bool,
            _ => return None,
        })
    }
}

impl std::fmt::Display for TorchDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// A tensor read from a torch file: contiguous, little-endian, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub shape: Vec<u64>,
    pub dtype: TorchDtype,
    pub data: Vec<u8>,
}

impl TorchTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The values as `f32` (integers and booleans converted; f64 rounded).
    pub fn to_f32(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            TorchDtype::F32 => Dtype::F32.to_f32(d),
            TorchDtype::F16 => Dtype::F16.to_f32(d),
            TorchDtype::BF16 => Dtype::BF16.to_f32(d),
            TorchDtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            TorchDtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            TorchDtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f32)
                .collect(),
            TorchDtype::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            TorchDtype::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            TorchDtype::U8 => d.iter().map(|&b| b as f32).collect(),
            TorchDtype::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// Whether each element is non-zero (a mask); -0.0 counts as zero, NaN as non-zero.
    pub fn nonzero(&self) -> Vec<bool> {
        match self.dtype {
            TorchDtype::U8 | TorchDtype::I8 | TorchDtype::Bool => {
                self.data.iter().map(|&b| b != 0).collect()
            }
            TorchDtype::I64 | TorchDtype::I32 | TorchDtype::I16 => self
                .data
                .chunks_exact(self.dtype.size())
                .map(|c| c.iter().any(|&b| b != 0))
                .collect(),
            _ => self.to_f32().into_iter().map(|v| v != 0.0).collect(),
        }
    }
}

/// A value read from a pickle: Python's plain types, and tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// A `dict` or `collections.OrderedDict`, in insertion order. A pickle may set one key
    /// twice; [`PyValue::get`] returns the last, as Python would.
    Dict(Vec<(PyValue, PyValue)>),
    Tensor(TorchTensor),
    /// A dtype constant (`torch.float32`) stored as a value.
    Dtype(TorchDtype),
}

impl PyValue {
    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Bytes(_) => "bytes",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
            PyValue::Tensor(_) => "tensor",
            PyValue::Dtype(_) => "dtype",
        }
    }

    /// The value at string key `key` of a dict (the last one set).
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An int or a float (or a bool) as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Int(i) => Some(*i as f64),
            PyValue::Float(f) => Some(*f),
            PyValue::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            PyValue::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// JSON for metadata: dicts with non-string keys get their keys' JSON text as keys,
    /// tuples become arrays, bytes and tensors a short description, non-finite floats `null`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            PyValue::None => J::Null,
            PyValue::Bool(b) => J::Bool(*b),
            PyValue::Int(i) => J::from(*i),
            PyValue::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            PyValue::Str(s) => J::String(s.clone()),
            PyValue::Bytes(b) => J::String(format!("<{} bytes>", b.len())),
            PyValue::List(v) | PyValue::Tuple(v) => {
                J::Array(v.iter().map(|x| x.to_json()).collect())
            }
            PyValue::Dict(items) => {
                let mut m = serde_json::Map::new();
                for (k, v) in items {
                    let key = match k {
                        PyValue::Str(s) => s.clone(),
                        other => other.to_json().to_string(),
                    };
                    m.insert(key, v.to_json());
                }
                J::Object(m)
            }
            PyValue::Tensor(t) => J::String(format!("<tensor {} {:?}>", t.dtype, t.shape)),
            PyValue::Dtype(d) => J::String(d.torch_name().to_string()),
        }
    }
}

/// Read a file written by `torch.save` (the zip format).
pub fn load(path: &Path) -> Result<PyValue> {
    let file = std::fs::File::open(path).at("open", path)?;
    let file_len = file.metadata().at("read", path)?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut reader, &mut magic).at("read", path)?;
    if n < 4 || &magic != b"PK\x03\x04" {
        return Err(Error::input(
            format!(
                "`{}` is not a zip file, so not a file written by torch.save (zip format)",
                path.display()
            ),
            Some(
                "xpm reads torch.save's zip format (torch ≥ 1.6); re-save a legacy file with \
                 torch.save(torch.load(f, weights_only=True), f)",
            ),
        ));
    }
    use std::io::Seek;
    reader.rewind().at("read", path)?;
    let archive = zip::ZipArchive::new(reader).map_err(|e| {
        Error::input(
            format!("`{}` is not a readable zip file: {e}", path.display()),
            Some("the file is damaged or truncated; fetch it again"),
        )
    })?;
    let mut zf = TorchZip {
        archive,
        path,
        file_len,
    };
    let top = zf.top_dir()?;
    let pkl_name = format!("{top}/data.pkl");
    if let Some(order) = zf.read_optional(&format!("{top}/byteorder"), 64)?
        && order != b"little"
    {
        return Err(Error::input(
            format!(
                "`{}` holds {} data (entry `{top}/byteorder`); xpm reads little-endian only",
                path.display(),
                String::from_utf8_lossy(&order)
            ),
            Some("re-save the file on a little-endian machine"),
        ));
    }
    let pkl = zf.read_entry(&pkl_name, None, MAX_PICKLE)?;
    let ctx = format!("`{}` (entry `{pkl_name}`)", path.display());
    let budget = file_len.saturating_mul(4).saturating_add(1 << 20);
    let mut storages = |key: &str, nbytes: u64| -> Result<Vec<u8>> {
        zf.read_entry(&format!("{top}/data/{key}"), Some(nbytes), nbytes)
    };
    load_pickle_with(&pkl, &ctx, budget, &mut storages)
}

/// Read a `torch.save`d state dict: a dict of names to tensors, in the file's order. Anything
/// else (a non-string key, a value that is not a tensor, a key set twice) is refused, naming
/// the key.
pub fn load_state_dict(path: &Path) -> Result<Vec<(String, TorchTensor)>> {
    let v = load(path)?;
    let PyValue::Dict(items) = v else {
        return Err(Error::input(
            format!(
                "`{}` holds a {}, not a dict of tensors (a state dict)",
                path.display(),
                v.kind()
            ),
            Some("this should be the file torch.save(model.state_dict(), …) wrote"),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in items {
        let PyValue::Str(name) = k else {
            return Err(Error::input(
                format!(
                    "`{}`: a key of the state dict is a {}, not a tensor name",
                    path.display(),
                    k.kind()
                ),
                Some("a state dict maps names (str) to tensors"),
            ));
        };
        let PyValue::Tensor(t) = v else {
            return Err(Error::input(
                format!(
                    "`{}`: `{name}` is a {}, not a tensor",
                    path.display(),
                    v.kind()
                ),
                Some("a state dict maps names (str) to tensors"),
            ));
        };
        if !seen.insert(name.clone()) {
            return Err(Error::input(
                format!("`{}`: `{name}` is set twice", path.display()),
                Some("torch.save never writes a key twice; the file was made by hand"),
            ));
        }
        out.push((name, t));
    }
    Ok(out)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

struct TorchZip<'a, R: Read + std::io::Seek> {
    archive: zip::ZipArchive<R>,
    path: &'a Path,
    file_len: u64,
}

impl<R: Read + std::io::Seek> TorchZip<'_, R> {
    fn bad(&self, what: String) -> Error {
        Error::input(
            format!("`{}`: {what}", self.path.display()),
            Some("this is not a file torch.save wrote, or it is damaged"),
        )
    }

    /// The one top directory holding `data.pkl`.
    fn top_dir(&self) -> Result<String> {
        let mut tops = Vec::new();
        for name in self.archive.file_names() {
            let Ok(name) = name else { continue };
            if let Some(top) = name.strip_suffix("/data.pkl")
                && !top.is_empty()
                && !top.contains('/')
            {
                tops.push(top.to_string());
            }
        }
        match tops.len() {
            1 => Ok(tops.pop().unwrap_or_default()),
            0 => Err(self.bad("no `<dir>/data.pkl` entry: not a torch.save zip file".into())),
            n => Err(self.bad(format!(
                "{n} `<dir>/data.pkl` entries; torch.save writes one"
            ))),
        }
    }

    fn read_optional(&mut self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        if self.archive.index_for_name(name).is_none() {
            return Ok(None);
        }
        self.read_entry(name, None, limit).map(Some)
    }

    /// An entry's bytes: STORED only, at most `limit` and the file's size, exactly `exact`
    /// bytes when given.
    fn read_entry(&mut self, name: &str, exact: Option<u64>, limit: u64) -> Result<Vec<u8>> {
        let path = self.path.to_path_buf();
        let file_len = self.file_len;
        let bad = |what: String| {
            Error::input(
                format!("`{}`: {what}", path.display()),
                Some("this is not a file torch.save wrote, or it is damaged"),
            )
        };
        let entry = match self.archive.by_name(name) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(bad(format!("no entry `{name}`")));
            }
            Err(e) => return Err(bad(format!("cannot read entry `{name}`: {e}"))),
        };
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(bad(format!(
                "entry `{name}` is compressed ({}); torch.save stores entries uncompressed",
                entry.compression()
            )));
        }
        let size = entry.size();
        if let Some(want) = exact
            && size != want
        {
            return Err(bad(format!(
                "entry `{name}` has {size} bytes; the pickle says {want}"
            )));
        }
        if size > limit || size > file_len {
            return Err(bad(format!(
                "entry `{name}` claims {size} bytes, more than {}",
                limit.min(file_len)
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        entry
            .take(size + 1)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("cannot read entry `{name}`: {e}")))?;
        if buf.len() as u64 != size {
            return Err(bad(format!(
                "entry `{name}` has {} bytes, its header says {size}",
                buf.len()
            )));
        }
        Ok(buf)
    }
}

/// Run the restricted pickle machine on `pkl` (a `data.pkl`); `ctx` names it in errors.
/// `storage(key, nbytes)` returns the bytes of storage `key` (exactly `nbytes`); at most
/// `byte_budget` bytes of tensor data are produced in all (views of one storage count each time).
pub fn load_pickle_with(
    pkl: &[u8],
    ctx: &str,
    byte_budget: u64,
    storage: &mut dyn FnMut(&str, u64) -> Result<Vec<u8>>,
) -> Result<PyValue> {
    let mut vm = Vm {
        data: pkl,
        pos: 0,
        ctx,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let top = vm.run()?;
    let mut conv = Convert {
        vm: &vm,
        storage,
        cache: HashMap::new(),
        nodes_left: 1_000_000u64.saturating_add((pkl.len() as u64).saturating_mul(4)),
        bytes_left: byte_budget,
    };
    conv.value(top, 0)
}

/// A value on the machine's stack: scalars inline, everything else an index into the arena.
#[derive(Debug, Clone, Copy)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    RebuildTensor,
    RebuildParameter,
    OrderedDict,
    Storage(TorchDtype),
    Dtype(TorchDtype),
    /// `_codecs.encode(str, 'latin1')`: how protocol 2 writes a non-empty `bytes`.
    CodecsEncode,
    /// `builtins.bytes()`: how protocol 2 writes an empty `bytes`.
    Bytes,
}

impl Global {
    fn name(self) -> String {
        match self {
            Global::RebuildTensor => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::Storage(d) => format!("the storage class of {d}"),
            Global::Dtype(d) => d.torch_name().into(),
            Global::CodecsEncode => "_codecs.encode".into(),
            Global::Bytes => "builtins.bytes".into(),
        }
    }
}

#[derive(Debug)]
struct TensorRef {
    storage: u32,
    offset: u64,
    shape: Vec<u64>,
}

#[derive(Debug)]
enum Obj {
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<V>),
    Tuple(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(Global),
    Storage {
        key: String,
        dtype: TorchDtype,
        numel: u64,
    },
    Tensor(TensorRef),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    ctx: &'a str,
    objs: Vec<Obj>,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
}

const HINT: &str = "xpm reads only what torch.save writes for tensors and plain containers \
                    (dict, list, tuple, str, numbers); re-save the file with plain values";

impl Vm<'_> {
    fn err(&self, at: usize, what: impl std::fmt::Display) -> Error {
        Error::input(format!("{} at byte {at}: {what}", self.ctx), Some(HINT))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                self.err(
                    start,
                    format!("the pickle is truncated (wants {n} more bytes)"),
                )
            })?;
        self.pos = end;
        Ok(&self.data[start..end])
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self, at: usize) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(MAX_NAME + 1).position(|&b| b == b'\n') else {
            return Err(self.err(at, "a GLOBAL name is unterminated or too long"));
        };
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.err(at, "a GLOBAL name is not UTF-8"))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn alloc(&mut self, at: usize, o: Obj) -> Result<V> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(self.err(at, format!("more than {MAX_OBJECTS} objects")));
        }
        self.objs.push(o);
        Ok(V::Obj((self.objs.len() - 1) as u32))
    }

    fn push(&mut self, at: usize, v: V) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(at, format!("more than {MAX_STACK} stack entries")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self, at: usize) -> Result<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, "stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(at, "stack underflow"))
    }

    fn top(&self, at: usize) -> Result<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, "stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err(at, "stack underflow"))
    }

    /// Everything above the last mark, and the mark.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<V>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, "no MARK to pop to"))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn memo_put(&mut self, at: usize, key: u32) -> Result<()> {
        let v = self.top(at)?;
        if self.memo.len() >= MAX_STACK && !self.memo.contains_key(&key) {
            return Err(self.err(at, format!("more than {MAX_STACK} memo entries")));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, at: usize, key: u32) -> Result<()> {
        let v = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(at, format!("memo entry {key} was never set")))?;
        self.push(at, v)
    }

    fn obj(&self, v: V) -> Option<&Obj> {
        match v {
            V::Obj(i) => self.objs.get(i as usize),
            _ => None,
        }
    }

    fn str_of(&self, v: V) -> Option<&str> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn string(&mut self, at: usize, n: u64) -> Result<V> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| {
                self.err(
                    at,
                    format!("a string of {n} bytes is longer than the rest of the pickle"),
                )
            })?;
        let b = self.take(n)?;
        let Ok(s) = std::str::from_utf8(b).map(str::to_string) else {
            return Err(self.err(at, "a string is not valid UTF-8"));
        };
        self.alloc(at, Obj::Str(s))
    }

    fn bytes(&mut self, at: usize, n: u64) -> Result<V> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| {
                self.err(
                    at,
                    format!("a bytes object of {n} bytes is longer than the rest of the pickle"),
                )
            })?;
        let b = self.take(n)?.to_vec();
        self.alloc(at, Obj::Bytes(b))
    }

    /// The allow-list: refuse any global not on it, here, before anything is built.
    fn global(&mut self, at: usize, module: &str, name: &str) -> Result<V> {
        let g = match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("_codecs", "encode") => Some(Global::CodecsEncode),
            ("__builtin__" | "builtins", "bytes") => Some(Global::Bytes),
            ("torch", n) => TorchDtype::from_storage_class(n)
                .map(Global::Storage)
                .or_else(|| TorchDtype::from_dtype_name(n).map(Global::Dtype)),
            _ => None,
        };
        let Some(g) = g else {
            return Err(Error::input(
                format!(
                    "refusing the pickle global `{module}.{name}` in {} at byte {at}: xpm reads \
                     only tensor rebuilds and plain containers",
                    self.ctx
                ),
                Some(
                    "a pickle that names other globals can run code when Python loads it; xpm \
                     never runs it. If the file is trusted, re-save it holding only tensors and \
                     plain values (dict, list, str, numbers)",
                ),
            ));
        };
        self.alloc(at, Obj::Global(g))
    }

    fn int_of(&self, at: usize, v: V, what: &str) -> Result<u64> {
        match v {
            V::Int(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.err(at, format!("{what} is not a non-negative int"))),
        }
    }

    fn ints_of(&self, at: usize, v: V, what: &str) -> Result<Vec<u64>> {
        let Some(Obj::Tuple(items)) = self.obj(v) else {
            return Err(self.err(at, format!("{what} is not a tuple")));
        };
        if items.len() > MAX_DEPTH {
            return Err(self.err(
                at,
                format!(
                    "{what} has {} dimensions (at most {MAX_DEPTH})",
                    items.len()
                ),
            ));
        }
        items.iter().map(|&x| self.int_of(at, x, what)).collect()
    }

    fn is_empty_dict(&self, v: V) -> bool {
        matches!(self.obj(v), Some(Obj::Dict(d)) if d.is_empty())
    }

    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])`, checked.
    fn rebuild_tensor(&mut self, at: usize, args: &[V]) -> Result<V> {
        if !(6..=7).contains(&args.len()) {
            return Err(self.err(
                at,
                format!(
                    "_rebuild_tensor_v2 with {} arguments (expected 6 or 7)",
                    args.len()
                ),
            ));
        }
        let V::Obj(sid) = args[0] else {
            return Err(self.err(at, "_rebuild_tensor_v2 of something that is not a storage"));
        };
        let Some(Obj::Storage {
            numel: storage_numel,
            key,
            ..
        }) = self.obj(args[0])
        else {
            return Err(self.err(at, "_rebuild_tensor_v2 of something that is not a storage"));
        };
        let (storage_numel, key) = (*storage_numel, key.clone());
        let offset = self.int_of(at, args[1], "the storage offset")?;
        let shape = self.ints_of(at, args[2], "the size")?;
        let stride = self.ints_of(at, args[3], "the stride")?;
        if !matches!(args[4], V::Bool(_)) {
            return Err(self.err(at, "requires_grad is not a bool"));
        }
        if !self.is_empty_dict(args[5]) || args.get(6).is_some_and(|&m| !self.is_empty_dict(m)) {
            return Err(self.err(
                at,
                "a tensor with backward hooks or extra metadata (xpm reads plain tensors only)",
            ));
        }
        if stride.len() != shape.len() {
            return Err(self.err(
                at,
                format!("size {shape:?} and stride {stride:?} differ in length"),
            ));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_NUMEL)
            .ok_or_else(|| {
                self.err(
                    at,
                    format!("a tensor of size {shape:?} has more than 2^56 elements"),
                )
            })?;
        if numel > 0 {
            let mut want = 1u64;
            for (&d, &s) in shape.iter().zip(&stride).rev() {
                if d != 1 && s != want {
                    return Err(self.err(
                        at,
                        format!(
                            "a tensor of size {shape:?} with stride {stride:?} is not contiguous; \
                             xpm reads contiguous tensors only (call .contiguous() before \
                             torch.save)"
                        ),
                    ));
                }
                want = want.saturating_mul(d);
            }
            match offset.checked_add(numel) {
                Some(end) if end <= storage_numel => {}
                _ => {
                    return Err(self.err(
                        at,
                        format!(
                            "a tensor of size {shape:?} at offset {offset} runs past the end of \
                             storage `{key}` ({storage_numel} elements)"
                        ),
                    ));
                }
            }
        }
        self.alloc(
            at,
            Obj::Tensor(TensorRef {
                storage: sid,
                offset,
                shape,
            }),
        )
    }

    fn reduce(&mut self, at: usize, f: V, args: V) -> Result<V> {
        let Some(Obj::Global(g)) = self.obj(f) else {
            return Err(self.err(at, "REDUCE of something that is not an allowed global"));
        };
        let g = *g;
        let Some(Obj::Tuple(a)) = self.obj(args) else {
            return Err(self.err(
                at,
                format!("REDUCE of `{}` without an argument tuple", g.name()),
            ));
        };
        if a.len() > 7 {
            return Err(self.err(
                at,
                format!(
                    "calling `{}` with {} arguments is not supported",
                    g.name(),
                    a.len()
                ),
            ));
        }
        let a = a.clone();
        match g {
            Global::OrderedDict if a.is_empty() => self.alloc(at, Obj::Dict(Vec::new())),
            Global::Bytes if a.is_empty() => self.alloc(at, Obj::Bytes(Vec::new())),
            Global::CodecsEncode
                if a.len() == 2 && matches!(self.str_of(a[1]), Some("latin1" | "latin-1")) =>
            {
                let text = self.str_of(a[0]).unwrap_or_default();
                let Ok(bytes) = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)))
                    .collect::<std::result::Result<Vec<u8>, _>>()
                else {
                    return Err(self.err(at, "_codecs.encode of a str that is not latin-1"));
                };
                if self.str_of(a[0]).is_none() {
                    return Err(self.err(at, "_codecs.encode of something that is not a str"));
                }
                self.alloc(at, Obj::Bytes(bytes))
            }
            Global::RebuildTensor => self.rebuild_tensor(at, &a),
            Global::RebuildParameter => {
                if a.len() != 3 || !matches!(self.obj(a[0]), Some(Obj::Tensor(_))) {
                    return Err(
                        self.err(at, "_rebuild_parameter of something that is not a tensor")
                    );
                }
                if !self.is_empty_dict(a[2]) {
                    return Err(self.err(at, "a parameter with backward hooks"));
                }
                Ok(a[0])
            }
            other => Err(self.err(
                at,
                format!(
                    "calling `{}` with these arguments is not supported",
                    other.name()
                ),
            )),
        }
    }

    fn persistent_load(&mut self, at: usize, pid: V) -> Result<V> {
        let t = match self.obj(pid) {
            Some(Obj::Tuple(t)) if t.len() == 5 => t.clone(),
            _ => {
                return Err(self.err(
                    at,
                    "a persistent id other than ('storage', <typed storage class>, key, location, numel)",
                ));
            }
        };
        let ok = self.str_of(t[0]) == Some("storage");
        let dtype = match self.obj(t.get(1).copied().unwrap_or(V::None)) {
            Some(Obj::Global(Global::Storage(d))) if ok => *d,
            _ => {
                return Err(self.err(
                    at,
                    "a persistent id other than ('storage', <typed storage class>, key, location, numel)",
                ));
            }
        };
        let key = self
            .str_of(t[2])
            .filter(|k| !k.is_empty() && k.len() <= MAX_NAME && !k.contains('\0'))
            .ok_or_else(|| self.err(at, "a storage key that is not a short string"))?
            .to_string();
        if self.str_of(t[3]).is_none() {
            return Err(self.err(at, "a storage location that is not a string"));
        }
        let numel = self.int_of(at, t[4], "a storage's element count")?;
        if numel > MAX_NUMEL {
            return Err(self.err(at, format!("storage `{key}` claims {numel} elements")));
        }
        self.alloc(at, Obj::Storage { key, dtype, numel })
    }

    /// Run to STOP. Each opcode is handled by exactly one of the handlers below (the opcode
    /// sets are disjoint); a handler returns `Ok(false)`, having done nothing, for an opcode
    /// that is not its own.
    fn run(&mut self) -> Result<V> {
        loop {
            let at = self.pos;
            if at >= self.data.len() {
                return Err(self.err(at, "the pickle ends without STOP (truncated)"));
            }
            let op = self.u8()?;
            if op == b'.' {
                let v = self.pop(at)?;
                return Ok(v);
            }
            let handled = self.op_machine(at, op)?
                || self.op_constant(at, op)?
                || self.op_container(at, op)?
                || self.op_call(at, op)?;
            if !handled {
                return Err(self.unsupported(at, op));
            }
        }
    }

    fn unsupported(&self, at: usize, op: u8) -> Error {
        self.err(
            at,
            format!(
                "unsupported pickle opcode 0x{op:02x}{}",
                if op.is_ascii_graphic() {
                    format!(" (`{}`)", op as char)
                } else {
                    String::new()
                }
            ),
        )
    }

    /// PROTO, FRAME, MARK and the memo (PUT, BINPUT, LONG_BINPUT, MEMOIZE, BINGET,
    /// LONG_BINGET).
    fn op_machine(&mut self, at: usize, op: u8) -> Result<bool> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(self.err(at, format!("pickle protocol {p} (at most 5)")));
                }
            }
            0x95 => {
                self.u64()?;
            }
            b'(' => {
                if self.marks.len() >= MAX_STACK {
                    return Err(self.err(at, "too many MARKs"));
                }
                self.marks.push(self.stack.len());
            }
            b'q' => {
                let k = self.u8()?;
                self.memo_put(at, k.into())?;
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(at, k)?;
            }
            0x94 => {
                let k = u32::try_from(self.memo.len())
                    .map_err(|_| self.err(at, "too many memo entries"))?;
                self.memo_put(at, k)?;
            }
            b'h' => {
                let k = self.u8()?;
                self.memo_get(at, k.into())?;
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(at, k)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Constants: ints, floats, bools, None, strings and bytes.
    fn op_constant(&mut self, at: usize, op: u8) -> Result<bool> {
        let v = match op {
            b'J' => V::Int((self.u32()? as i32).into()),
            b'K' => V::Int(self.u8()?.into()),
            b'M' => V::Int(self.u16()?.into()),
            0x8a => V::Int(self.long1(at)?),
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                V::Float(f64::from_be_bytes(a))
            }
            0x88 => V::Bool(true),
            0x89 => V::Bool(false),
            b'N' => V::None,
            b'X' => {
                let n = self.u32()?;
                self.string(at, n.into())?
            }
            0x8c => {
                let n = self.u8()?;
                self.string(at, n.into())?
            }
            0x8d => {
                let n = self.u64()?;
                self.string(at, n)?
            }
            b'C' => {
                let n = self.u8()?;
                self.bytes(at, n.into())?
            }
            b'B' => {
                let n = self.u32()?;
                self.bytes(at, n.into())?
            }
            0x8e => {
                let n = self.u64()?;
                self.bytes(at, n)?
            }
            _ => return Ok(false),
        };
        self.push(at, v)?;
        Ok(true)
    }

    /// LONG1's operand: a little-endian two's-complement integer of at most 8 bytes.
    fn long1(&mut self, at: usize) -> Result<i64> {
        let n = usize::from(self.u8()?);
        if n > 8 {
            return Err(self.err(at, format!("an integer of {n} bytes (at most 8)")));
        }
        let b = self.take(n)?;
        let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            [0xffu8; 8]
        } else {
            [0u8; 8]
        };
        a[..n].copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    /// Containers: tuples, lists and dicts built or extended, and BUILD of a dict's state.
    fn op_container(&mut self, at: usize, op: u8) -> Result<bool> {
        match op {
            b')' => {
                let v = self.alloc(at, Obj::Tuple(Vec::new()))?;
                self.push(at, v)?;
            }
            b't' => {
                let items = self.pop_mark(at)?;
                let v = self.alloc(at, Obj::Tuple(items))?;
                self.push(at, v)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop(at)?);
                }
                items.reverse();
                let v = self.alloc(at, Obj::Tuple(items))?;
                self.push(at, v)?;
            }
            b']' => {
                let v = self.alloc(at, Obj::List(Vec::new()))?;
                self.push(at, v)?;
            }
            b'l' => {
                let items = self.pop_mark(at)?;
                let v = self.alloc(at, Obj::List(items))?;
                self.push(at, v)?;
            }
            b'a' | b'e' => self.append(at, op)?,
            b'}' => {
                let v = self.alloc(at, Obj::Dict(Vec::new()))?;
                self.push(at, v)?;
            }
            b'd' | b's' | b'u' => self.set_items(at, op)?,
            b'b' => {
                // Only an OrderedDict's instance state (a state dict's `_metadata`): dropped.
                let state = self.pop(at)?;
                let target = self.top(at)?;
                let ok = matches!(self.obj(target), Some(Obj::Dict(_)))
                    && matches!(self.obj(state), Some(Obj::Dict(_)));
                if !ok {
                    return Err(self.err(at, "BUILD of something other than a dict's attributes"));
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// APPEND (`a`) and APPENDS (`e`).
    fn append(&mut self, at: usize, op: u8) -> Result<()> {
        let items = if op == b'a' {
            vec![self.pop(at)?]
        } else {
            self.pop_mark(at)?
        };
        let target = self.top(at)?;
        match target {
            V::Obj(i) => match self.objs.get_mut(i as usize) {
                Some(Obj::List(l)) => l.extend(items),
                _ => return Err(self.err(at, "APPEND to something that is not a list")),
            },
            _ => return Err(self.err(at, "APPEND to something that is not a list")),
        }
        Ok(())
    }

    /// DICT (`d`), SETITEM (`s`) and SETITEMS (`u`).
    fn set_items(&mut self, at: usize, op: u8) -> Result<()> {
        let items = match op {
            b's' => {
                let v = self.pop(at)?;
                let k = self.pop(at)?;
                vec![k, v]
            }
            _ => self.pop_mark(at)?,
        };
        if items.len() % 2 != 0 {
            return Err(self.err(at, "a dict with a key and no value"));
        }
        let pairs: Vec<(V, V)> = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        if op == b'd' {
            let v = self.alloc(at, Obj::Dict(pairs))?;
            self.push(at, v)?;
        } else {
            let target = self.top(at)?;
            match target {
                V::Obj(i) => match self.objs.get_mut(i as usize) {
                    Some(Obj::Dict(d)) => d.extend(pairs),
                    _ => {
                        return Err(self.err(at, "SETITEM on something that is not a dict"));
                    }
                },
                _ => {
                    return Err(self.err(at, "SETITEM on something that is not a dict"));
                }
            }
        }
        Ok(())
    }

    /// Globals (GLOBAL, STACK_GLOBAL: the allow-list), persistent ids (storages) and REDUCE.
    fn op_call(&mut self, at: usize, op: u8) -> Result<bool> {
        let v = match op {
            b'c' => {
                let module = self.line(at)?;
                let name = self.line(at)?;
                self.global(at, &module, &name)?
            }
            0x93 => {
                let name = self.pop(at)?;
                let module = self.pop(at)?;
                let (Some(m), Some(n)) = (self.str_of(module), self.str_of(name)) else {
                    return Err(self.err(at, "STACK_GLOBAL of something that is not a string"));
                };
                let (m, n) = (m.to_string(), n.to_string());
                self.global(at, &m, &n)?
            }
            b'Q' => {
                let pid = self.pop(at)?;
                self.persistent_load(at, pid)?
            }
            b'R' => {
                let args = self.pop(at)?;
                let f = self.pop(at)?;
                self.reduce(at, f, args)?
            }
            _ => return Ok(false),
        };
        self.push(at, v)?;
        Ok(true)
    }
}

/// Turns the machine's object graph into a tree, reading storages, within budgets.
struct Convert<'a, 'b> {
    vm: &'a Vm<'b>,
    storage: &'a mut dyn FnMut(&str, u64) -> Result<Vec<u8>>,
    cache: HashMap<String, (TorchDtype, std::rc::Rc<Vec<u8>>)>,
    nodes_left: u64,
    bytes_left: u64,
}

impl Convert<'_, '_> {
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::input(format!("{}: {what}", self.vm.ctx), Some(HINT))
    }

    fn value(&mut self, v: V, depth: usize) -> Result<PyValue> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!(
                "containers nested deeper than {MAX_DEPTH} levels (or a container inside itself)"
            )));
        }
        if self.nodes_left == 0 {
            return Err(self.err(
                "the pickle expands to too many values (the same objects referred to over and over)",
            ));
        }
        self.nodes_left -= 1;
        let vm = self.vm;
        Ok(match v {
            V::None => PyValue::None,
            V::Bool(b) => PyValue::Bool(b),
            V::Int(i) => PyValue::Int(i),
            V::Float(f) => PyValue::Float(f),
            V::Obj(i) => match vm.objs.get(i as usize) {
                None => return Err(self.err("a dangling object reference")),
                Some(Obj::Str(s)) => {
                    self.charge(s.len() as u64)?;
                    PyValue::Str(s.clone())
                }
                Some(Obj::Bytes(b)) => {
                    self.charge(b.len() as u64)?;
                    PyValue::Bytes(b.clone())
                }
                Some(Obj::List(items)) => PyValue::List(self.values(items, depth)?),
                Some(Obj::Tuple(items)) => PyValue::Tuple(self.values(items, depth)?),
                Some(Obj::Dict(pairs)) => {
                    let mut out = Vec::with_capacity(pairs.len().min(1 << 16));
                    for &(k, x) in pairs {
                        out.push((self.value(k, depth + 1)?, self.value(x, depth + 1)?));
                    }
                    PyValue::Dict(out)
                }
                Some(Obj::Global(Global::Dtype(d))) => PyValue::Dtype(*d),
                Some(Obj::Global(g)) => {
                    return Err(self.err(format!(
                        "`{}` stands as a value (not called); xpm reads no callables",
                        g.name()
                    )));
                }
                Some(Obj::Storage { key, .. }) => {
                    return Err(self.err(format!(
                        "storage `{key}` stands as a value, not inside a tensor"
                    )));
                }
                Some(Obj::Tensor(t)) => PyValue::Tensor(self.tensor(t)?),
            },
        })
    }

    fn values(&mut self, items: &[V], depth: usize) -> Result<Vec<PyValue>> {
        let mut out = Vec::with_capacity(items.len().min(1 << 16));
        for &x in items {
            out.push(self.value(x, depth + 1)?);
        }
        Ok(out)
    }

    fn charge(&mut self, n: u64) -> Result<()> {
        if n > self.bytes_left {
            return Err(self.err(
                "the pickle expands to more data than the file holds (the same tensors or strings \
                 referred to over and over)",
            ));
        }
        self.bytes_left -= n;
        Ok(())
    }

    fn tensor(&mut self, t: &TensorRef) -> Result<TorchTensor> {
        let Some(Obj::Storage { key, dtype, numel }) = self.vm.objs.get(t.storage as usize) else {
            return Err(self.err("a tensor without a storage"));
        };
        let (dtype, es) = (*dtype, dtype.size() as u64);
        let n: u64 = t.shape.iter().product();
        let nbytes = n * es;
        self.charge(nbytes)?;
        let bytes = match self.cache.get(key) {
            Some((d, b)) => {
                if *d != dtype || b.len() as u64 != numel * es {
                    return Err(
                        self.err(format!("storage `{key}` is used with two dtypes or sizes"))
                    );
                }
                b.clone()
            }
            None => {
                let total = numel
                    .checked_mul(es)
                    .ok_or_else(|| self.err(format!("storage `{key}` is too large")))?;
                let b = (self.storage)(key, total)?;
                if b.len() as u64 != total {
                    return Err(self.err(format!(
                        "storage `{key}` has {} bytes, expected {total}",
                        b.len()
                    )));
                }
                let b = std::rc::Rc::new(b);
                self.cache.insert(key.clone(), (dtype, b.clone()));
                b
            }
        };
        let data = if n == 0 {
            Vec::new()
        } else {
            // Checked at REDUCE: offset + n <= numel, so this is in range.
            let start = (t.offset * es) as usize;
            bytes
                .get(start..start + nbytes as usize)
                .ok_or_else(|| self.err(format!("a tensor runs past storage `{key}`")))?
                .to_vec()
        };
        Ok(TorchTensor {
            shape: t.shape.clone(),
            dtype,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny pickle writer for hand-made inputs.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn op(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn s(mut self, s: &str) -> Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(mut self, i: u8) -> Self {
            self.0.extend_from_slice(&[b'K', i]);
            self
        }
        fn global(self, m: &str, n: &str) -> Self {
            self.op(format!("c{m}\n{n}\n").as_bytes())
        }
        /// `_rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), offset, size,
        /// stride, False, OrderedDict())`
        fn tensor(self, key: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Self {
            let mut p = self
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"(")
                .op(b"(")
                .s("storage")
                .global("torch", "FloatStorage")
                .s(key)
                .s("cpu")
                .int(numel)
                .op(b"tQ")
                .int(offset)
                .op(b"(");
            for &d in size {
                p = p.int(d);
            }
            p = p.op(b"t(");
            for &d in stride {
                p = p.int(d);
            }
            p.op(b"t\x89")
                .global("collections", "OrderedDict")
                .op(b")R")
                .op(b"tR")
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn storages(key: &str, n: u64) -> Result<Vec<u8>> {
        match key {
            "0" if n == 24 => Ok(f32s(&[1., 2., 3., 4., 5., 6.])),
            _ => Err(Error::input(format!("no storage {key} of {n} bytes"), None)),
        }
    }

    fn run(p: &[u8]) -> Result<PyValue> {
        load_pickle_with(p, "test.pkl", 1 << 20, &mut storages)
    }

    /// `OrderedDict(w=[2, 3] view, row=[3] view at offset 3)` with a `_metadata` attribute.
    fn state_dict_pickle() -> Vec<u8> {
        P::default()
            .op(b"\x80\x02")
            .global("collections", "OrderedDict")
            .op(b"q\x00)R(")
            .s("w")
            .tensor("0", 6, 0, &[2, 3], &[3, 1])
            .s("row")
            .tensor("0", 6, 3, &[3], &[1])
            .op(b"u}")
            .s("_metadata")
            .op(b"}sb.")
            .0
    }

    #[test]
    fn a_hand_made_state_dict_reads() {
        let v = run(&state_dict_pickle()).unwrap();
        let PyValue::Dict(items) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(items.len(), 2);
        let Some(PyValue::Tensor(w)) = v.get("w") else {
            panic!()
        };
        assert_eq!(w.shape, vec![2, 3]);
        assert_eq!(w.dtype, TorchDtype::F32);
        assert_eq!(w.to_f32(), vec![1., 2., 3., 4., 5., 6.]);
        let Some(PyValue::Tensor(r)) = v.get("row") else {
            panic!()
        };
        assert_eq!(r.to_f32(), vec![4., 5., 6.]);
    }

    #[test]
    fn plain_metadata_reads() {
        let p = P::default()
            .op(b"\x80\x02}(")
            .s("rank")
            .int(4)
            .s("alpha")
            .op(b"G\x3f\xf8\x00\x00\x00\x00\x00\x00")
            .s("list")
            .op(b"](K\x01N\x88\x89e")
            .s("big")
            .op(b"\x8a\x06\x00\x00\x00\x00\x00\x01")
            .s("neg")
            .op(b"J\xfb\xff\xff\xff")
            .s("dtype")
            .global("torch", "bfloat16")
            .s("bytes")
            .global("_codecs", "encode")
            .s("\u{1}\u{ff}")
            .s("latin1")
            .op(b"\x86R")
            .s("empty")
            .global("__builtin__", "bytes")
            .op(b")R")
            .op(b"u.")
            .0;
        let v = run(&p).unwrap();
        assert_eq!(v.get("rank"), Some(&PyValue::Int(4)));
        assert_eq!(v.get("alpha"), Some(&PyValue::Float(1.5)));
        assert_eq!(v.get("big"), Some(&PyValue::Int(1 << 40)));
        assert_eq!(v.get("neg"), Some(&PyValue::Int(-5)));
        assert_eq!(v.get("dtype"), Some(&PyValue::Dtype(TorchDtype::BF16)));
        assert_eq!(v.get("bytes"), Some(&PyValue::Bytes(vec![1, 255])));
        assert_eq!(v.get("empty"), Some(&PyValue::Bytes(vec![])));
        assert_eq!(
            v.get("list"),
            Some(&PyValue::List(vec![
                PyValue::Int(1),
                PyValue::None,
                PyValue::Bool(true),
                PyValue::Bool(false)
            ]))
        );
        assert_eq!(v.to_json()["alpha"], serde_json::json!(1.5));
    }

    #[test]
    fn os_system_is_refused_at_the_global() {
        // What a __reduce__ returning (os.system, ("touch /tmp/x",)) pickles to.
        let p = P::default()
            .op(b"\x80\x02")
            .global("os", "system")
            .s("touch /tmp/xpm-pwned")
            .op(b"\x85R.")
            .0;
        let e = run(&p).unwrap_err().to_string();
        assert!(
            e.contains("refusing the pickle global `os.system` in test.pkl at byte 2"),
            "{e}"
        );
        // Also through STACK_GLOBAL, and builtins that would look harmless.
        let p = P::default()
            .op(b"\x80\x04")
            .s("builtins")
            .s("eval")
            .op(b"\x93.")
            .0;
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("`builtins.eval`"), "{e}");
        // An allowed callable that survives as a value is refused too.
        let p = P::default().global("collections", "OrderedDict").op(b".").0;
        assert!(
            run(&p)
                .unwrap_err()
                .to_string()
                .contains("xpm reads no callables")
        );
    }

    #[test]
    fn a_memo_bomb_is_refused_by_the_budget() {
        // l0 = []; l(i+1) = [li, li]: 2^41 values from 60 levels of a few bytes each.
        let mut p = P::default().op(b"\x80\x02]q\x00");
        for _ in 0..40 {
            p = p.op(b"(h\x00h\x00lq\x00");
        }
        let p = p.op(b".").0;
        let t = std::time::Instant::now();
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("too many values"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
        // A list inside itself.
        let p = P::default().op(b"]q\x00h\x00a.").0;
        assert!(run(&p).unwrap_err().to_string().contains("nested deeper"));
    }

    #[test]
    fn truncated_and_mutated_input_errs_without_panicking() {
        let full = state_dict_pickle();
        for n in 0..full.len() {
            assert!(run(&full[..n]).is_err(), "prefix of {n} bytes");
        }
        for i in 0..full.len() {
            for b in [0u8, 0x7f, 0xff, b'(', b'.', b'R'] {
                let mut m = full.clone();
                m[i] = b;
                let _ = run(&m);
            }
        }
    }

    #[test]
    fn unsupported_opcodes_and_tensors_are_refused() {
        let e = run(b"\x80\x02I1\n.").unwrap_err().to_string();
        assert!(
            e.contains("unsupported pickle opcode 0x49 (`I`)") && e.contains("byte 2"),
            "{e}"
        );
        // Not contiguous (a transpose).
        let p = P::default().tensor("0", 6, 0, &[3, 2], &[1, 3]).op(b".").0;
        assert!(run(&p).unwrap_err().to_string().contains("not contiguous"));
        // Past the end of the storage.
        let p = P::default().tensor("0", 6, 4, &[3], &[1]).op(b".").0;
        assert!(
            run(&p)
                .unwrap_err()
                .to_string()
                .contains("runs past the end")
        );
        // A storage whose bytes do not come back.
        let p = P::default().tensor("1", 6, 0, &[6], &[1]).op(b".").0;
        assert!(run(&p).unwrap_err().to_string().contains("no storage 1"));
        // A string longer than the pickle.
        assert!(
            run(b"X\xff\xff\xff\x7fabc.")
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
    }

    #[test]
    fn a_torch_zip_reads_and_compressed_or_foreign_files_are_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.ckpt");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("e/data.pkl", o).unwrap();
        z.write_all(&state_dict_pickle()).unwrap();
        z.start_file("e/byteorder", o).unwrap();
        z.write_all(b"little").unwrap();
        z.start_file("e/data/0", o).unwrap();
        z.write_all(&f32s(&[1., 2., 3., 4., 5., 6.])).unwrap();
        z.finish().unwrap();
        let sd = load_state_dict(&path).unwrap();
        assert_eq!(sd.len(), 2);
        assert_eq!(sd[0].0, "w");
        assert_eq!(sd[1].1.to_f32(), vec![4., 5., 6.]);

        let legacy = dir.path().join("legacy.pt");
        std::fs::write(&legacy, b"\x80\x02\x8a\x0a").unwrap();
        let e = load(&legacy).unwrap_err().to_string();
        assert!(e.contains("not a zip file"), "{e}");
    }
}
