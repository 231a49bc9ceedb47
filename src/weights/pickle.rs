//! A small pickle reader for PyTorch weight files: exactly the opcodes `torch.save` emits
//! (protocols 2 and 4, plus the Python 2 string opcodes of 2017-era files), and a fixed
//! allow-list of globals. Nothing is ever executed: `REDUCE` of an allowed global is
//! interpreted here (an `OrderedDict`, a tensor view of a storage), anything else is an error
//! that names the global.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// Element type of a torch storage, from its class name (`torch.FloatStorage`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F16 | StorageDtype::BF16 => 2,
            StorageDtype::F32 => 4,
            StorageDtype::F64 | StorageDtype::I64 => 8,
        }
    }
}

/// An allow-listed global.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Global {
    OrderedDict,
    /// `torch._utils._rebuild_tensor(storage, offset, size, stride)` (PyTorch ≤ 0.3).
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, …)`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`.
    RebuildParameter,
    Storage(StorageDtype),
}

/// A storage named by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    /// Elements held under `key`.
    pub numel: usize,
    /// Element offset of a legacy storage view into the storage `key` (else 0).
    pub view_offset: usize,
}

/// A strided view of a storage (not yet read).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements, relative to the storage (view).
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class/function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(StorageDtype::F32),
        ("torch", "DoubleStorage") => Global::Storage(StorageDtype::F64),
        ("torch", "HalfStorage") => Global::Storage(StorageDtype::F16),
        ("torch", "BFloat16Storage") => Global::Storage(StorageDtype::BF16),
        ("torch", "LongStorage") => Global::Storage(StorageDtype::I64),
        _ => bail!(
            "the pickle refers to '{module}.{name}', which is not on mura's allow-list \
             (a weights file needs only OrderedDict, tensors and Float/Double/Half/BFloat16/Long storages)"
        ),
    })
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 && *i <= usize::MAX as i128 => Ok(*i as usize),
        _ => bail!("{what}: expected a non-negative int, found {}", v.kind()),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(xs) | Value::List(xs) => xs.iter().map(|x| as_usize(x, what)).collect(),
        _ => bail!("{what}: expected a tuple of ints, found {}", v.kind()),
    }
}

fn as_str(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        _ => bail!("{what}: expected a string, found {}", v.kind()),
    }
}

/// Interprets a persistent id `('storage', storage_type, key, location, numel[, view_metadata])`.
fn storage_from_pid(pid: Value) -> Result<Value> {
    let Value::Tuple(t) = pid else {
        bail!("persistent id is a {}, not a tuple", pid.kind());
    };
    if t.len() < 5 || t[0] != Value::Str("storage".into()) {
        bail!("persistent id is not a ('storage', …) tuple");
    }
    let Value::Global(Global::Storage(dtype)) = t[1] else {
        bail!(
            "persistent id names a {} instead of a storage type",
            t[1].kind()
        );
    };
    let key = match &t[2] {
        Value::Int(i) => i.to_string(),
        v => as_str(v, "storage key")?,
    };
    let numel = as_usize(&t[4], "storage size")?;
    let view_offset = match t.get(5) {
        None | Some(Value::None) => 0,
        // Legacy views: (view_key, offset, view_size) into the storage `key`.
        Some(Value::Tuple(v)) if v.len() == 3 => as_usize(&v[1], "storage view offset")?,
        Some(v) => bail!("unexpected storage view metadata ({})", v.kind()),
    };
    Ok(Value::Storage(StorageRef {
        key,
        dtype,
        numel,
        view_offset,
    }))
}

fn reduce(f: Value, args: Value) -> Result<Value> {
    let Value::Global(g) = f else {
        bail!("REDUCE on a {}, not a class or function", f.kind());
    };
    let Value::Tuple(a) = args else {
        bail!("REDUCE arguments are a {}, not a tuple", args.kind());
    };
    match g {
        Global::OrderedDict if a.is_empty() => Ok(Value::Dict(Vec::new())),
        Global::RebuildTensor | Global::RebuildTensorV2 if a.len() >= 4 => {
            let Value::Storage(storage) = a[0].clone() else {
                bail!("tensor built from a {}, not a storage", a[0].kind());
            };
            Ok(Value::Tensor(TensorRef {
                storage,
                offset: as_usize(&a[1], "tensor storage offset")?,
                size: as_usizes(&a[2], "tensor size")?,
                stride: as_usizes(&a[3], "tensor stride")?,
            }))
        }
        Global::RebuildParameter if !a.is_empty() => match &a[0] {
            Value::Tensor(_) => Ok(a[0].clone()),
            v => bail!("parameter built from a {}, not a tensor", v.kind()),
        },
        _ => bail!("unsupported call {g:?} with {} arguments", a.len()),
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            bail!("truncated pickle (needs {n} bytes at byte {})", self.pos);
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!("truncated pickle (unterminated GLOBAL)");
        };
        let s = std::str::from_utf8(&rest[..n]).context("GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        Ok(std::str::from_utf8(b)
            .context("string is not UTF-8")?
            .to_string())
    }
}

/// Signed little-endian two's-complement integer of LONG1/LONG4 (up to 16 bytes).
fn long(bytes: &[u8]) -> Result<i128> {
    if bytes.len() > 16 {
        bail!("integer of {} bytes is too large", bytes.len());
    }
    let mut v: i128 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        v |= (b as i128) << (8 * i);
    }
    let bits = 8 * bytes.len() as u32;
    if bits > 0 && bits < 128 && bytes[bytes.len() - 1] & 0x80 != 0 {
        v -= 1i128 << bits;
    }
    Ok(v)
}

/// Reads one pickle from the start of `data`. Returns the object and the bytes consumed
/// (legacy `.pth` files hold several pickles back to back).
pub fn read(data: &[u8]) -> Result<(Value, usize)> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    loop {
        let at = r.pos;
        let op = r.u8()?;
        step(&mut r, op, &mut stack, &mut marks, &mut memo)
            .with_context(|| format!("pickle opcode 0x{op:02x} at byte {at}"))?;
        if op == b'.' {
            let v = stack.pop().context("pickle STOP with an empty stack")?;
            return Ok((v, r.pos));
        }
    }
}

fn pop(stack: &mut Vec<Value>) -> Result<Value> {
    stack.pop().context("pickle stack underflow")
}

fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>) -> Result<Vec<Value>> {
    let m = marks.pop().context("pickle MARK missing")?;
    if m > stack.len() {
        bail!("pickle MARK beyond the stack");
    }
    Ok(stack.split_off(m))
}

fn step(
    r: &mut Reader,
    op: u8,
    stack: &mut Vec<Value>,
    marks: &mut Vec<usize>,
    memo: &mut HashMap<u32, Value>,
) -> Result<()> {
    match op {
        0x80 => {
            let proto = r.u8()?;
            if proto > 5 {
                bail!("unsupported pickle protocol {proto}");
            }
        }
        0x95 => {
            r.u64()?; // FRAME: a length hint only
        }
        b'.' => {}
        b'(' => marks.push(stack.len()),
        b'}' => stack.push(Value::Dict(Vec::new())),
        b']' => stack.push(Value::List(Vec::new())),
        b')' => stack.push(Value::Tuple(Vec::new())),
        b't' => {
            let items = pop_mark(stack, marks)?;
            stack.push(Value::Tuple(items));
        }
        0x85..=0x87 => {
            let n = (op - 0x84) as usize;
            if stack.len() < n {
                bail!("pickle stack underflow");
            }
            let items = stack.split_off(stack.len() - n);
            stack.push(Value::Tuple(items));
        }
        b'X' => {
            let n = r.u32()? as usize;
            stack.push(Value::Str(r.string(n)?));
        }
        0x8c => {
            let n = r.u8()? as usize;
            stack.push(Value::Str(r.string(n)?));
        }
        0x8d => {
            let n = usize::try_from(r.u64()?)?;
            stack.push(Value::Str(r.string(n)?));
        }
        // Python 2 `str` (BINSTRING / SHORT_BINSTRING): torch.load decodes it as UTF-8.
        b'T' => {
            let n = r.u32()? as usize;
            stack.push(Value::Str(r.string(n)?));
        }
        b'U' => {
            let n = r.u8()? as usize;
            stack.push(Value::Str(r.string(n)?));
        }
        b'B' => {
            let n = r.u32()? as usize;
            stack.push(Value::Bytes(r.take(n)?.to_vec()));
        }
        b'C' => {
            let n = r.u8()? as usize;
            stack.push(Value::Bytes(r.take(n)?.to_vec()));
        }
        b'J' => stack.push(Value::Int(r.u32()? as i32 as i128)),
        b'K' => stack.push(Value::Int(r.u8()? as i128)),
        b'M' => stack.push(Value::Int(r.u16()? as i128)),
        0x8a => {
            let n = r.u8()? as usize;
            stack.push(Value::Int(long(r.take(n)?)?));
        }
        0x8b => {
            let n = r.u32()? as usize;
            stack.push(Value::Int(long(r.take(n)?)?));
        }
        b'G' => stack.push(Value::Float(f64::from_be_bytes(
            r.take(8)?.try_into().unwrap(),
        ))),
        0x88 => stack.push(Value::Bool(true)),
        0x89 => stack.push(Value::Bool(false)),
        b'N' => stack.push(Value::None),
        b's' => {
            let v = pop(stack)?;
            let k = pop(stack)?;
            match stack.last_mut() {
                Some(Value::Dict(d)) => d.push((k, v)),
                _ => bail!("SETITEM on something that is not a dict"),
            }
        }
        b'u' => {
            let items = pop_mark(stack, marks)?;
            if items.len() % 2 != 0 {
                bail!("SETITEMS with an odd number of items");
            }
            let Some(Value::Dict(d)) = stack.last_mut() else {
                bail!("SETITEMS on something that is not a dict");
            };
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
        }
        b'a' => {
            let v = pop(stack)?;
            match stack.last_mut() {
                Some(Value::List(l)) => l.push(v),
                _ => bail!("APPEND on something that is not a list"),
            }
        }
        b'e' => {
            let items = pop_mark(stack, marks)?;
            match stack.last_mut() {
                Some(Value::List(l)) => l.extend(items),
                _ => bail!("APPENDS on something that is not a list"),
            }
        }
        b'h' | b'j' => {
            let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
            let v = memo.get(&i).with_context(|| format!("memo {i} unset"))?;
            stack.push(v.clone());
        }
        b'q' | b'r' | 0x94 => {
            let i = match op {
                b'q' => r.u8()? as u32,
                b'r' => r.u32()?,
                _ => memo.len() as u32,
            };
            let v = stack.last().context("memoize on an empty stack")?;
            memo.insert(i, v.clone());
        }
        b'c' => {
            let module = r.line()?;
            let name = r.line()?;
            stack.push(Value::Global(resolve_global(module, name)?));
        }
        0x93 => {
            let name = as_str(&pop(stack)?, "STACK_GLOBAL name")?;
            let module = as_str(&pop(stack)?, "STACK_GLOBAL module")?;
            stack.push(Value::Global(resolve_global(&module, &name)?));
        }
        b'R' => {
            let args = pop(stack)?;
            let f = pop(stack)?;
            stack.push(reduce(f, args)?);
        }
        b'b' => {
            // Object state (an OrderedDict's `_metadata`, a tensor's extra attributes):
            // nothing mura needs.
            let _state = pop(stack)?;
            match stack.last() {
                Some(Value::Dict(_)) | Some(Value::Tensor(_)) => {}
                Some(v) => bail!("BUILD on a {}", v.kind()),
                None => bail!("pickle stack underflow"),
            }
        }
        b'Q' => {
            let pid = pop(stack)?;
            stack.push(storage_from_pid(pid)?);
        }
        _ => bail!("unsupported pickle opcode (not one torch.save writes for a state dict)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python2_strings_and_longs() {
        // Protocol 2: {'a': 1, 'bb': -2, 'c': 0x1950a86a20f9469cfc6c, 'd': 1.5, 'e': [True, None]}
        // with Python 2 SHORT_BINSTRING keys, hand-assembled.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([b'U', 1, b'a', b'K', 1]);
        p.extend([b'U', 2, b'b', b'b', b'J']);
        p.extend((-2i32).to_le_bytes());
        p.extend([b'U', 1, b'c', 0x8a, 10]);
        p.extend([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
        p.extend([b'X', 1, 0, 0, 0, b'd', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([b'X', 1, 0, 0, 0, b'e', b']', b'(', 0x88, b'N', b'e']);
        p.extend([b'u', b'.']);
        let (v, n) = read(&p).unwrap();
        assert_eq!(n, p.len());
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(d[0], (Value::Str("a".into()), Value::Int(1)));
        assert_eq!(d[1], (Value::Str("bb".into()), Value::Int(-2)));
        assert_eq!(d[2].1, Value::Int(0x1950a86a20f9469cfc6c));
        assert_eq!(d[3].1, Value::Float(1.5));
        assert_eq!(d[4].1, Value::List(vec![Value::Bool(true), Value::None]));
    }

    #[test]
    fn long1_negative() {
        assert_eq!(long(&[0xff]).unwrap(), -1);
        assert_eq!(long(&[0x00, 0x80]).unwrap(), -32768);
        assert_eq!(long(&[0xff, 0x00]).unwrap(), 255);
        assert_eq!(long(&[]).unwrap(), 0);
    }

    #[test]
    fn refuses_unknown_globals() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let e = format!("{:#}", read(p).unwrap_err());
        assert!(e.contains("'os.system'"), "{e}");
    }

    #[test]
    fn truncated_is_an_error() {
        let p = b"\x80\x02}q\x00X\x05\x00\x00\x00ab";
        let e = format!("{:#}", read(p).unwrap_err());
        assert!(e.contains("truncated"), "{e}");
    }
}
