//! A small pickle reader for PyTorch weight files: exactly the opcodes `torch.save` emits
//! (protocols 2 and 4, plus the Python 2 string opcodes of 2017-era files), and a fixed
//! allow-list of globals. Nothing is ever executed: `REDUCE` of an allowed global is
//! interpreted here (an `OrderedDict`, a tensor view of a storage), anything else is an error
//! that names the global.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::rc::Rc;

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
    pub key: Rc<str>,
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

/// The most nested containers a pickle may build (a state dict needs fewer than ten), so that
/// no value is too deep to compare or drop without exhausting the stack.
pub const MAX_DEPTH: usize = 100;
/// The most values a pickle may build, shared ones counted once (torchvision's DenseNet-201
/// needs about 30,000), so that a memo bomb is refused before it exhausts memory.
pub const MAX_VALUES: usize = 1 << 22;
/// The most dimensions a tensor may have.
pub const MAX_DIMS: usize = 64;

/// A container's items and its nesting depth (1 + its deepest item's).
#[derive(Clone, Debug, PartialEq)]
pub struct Node<T> {
    depth: usize,
    pub items: Vec<T>,
}

/// A pickled value. Containers, strings and tensors are shared (`Rc`), never copied: a memo
/// read is one pointer. Shared values are immutable; filling a list or dict that the memo
/// also holds copies it first, so the memo keeps the value as it was when memoised (Python
/// would share the filled one; `torch.save` never refers back to a container it is filling).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Node<Value>>),
    List(Rc<Node<Value>>),
    /// dict or OrderedDict, in insertion order.
    Dict(Rc<Node<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub fn kind(&self) -> &'static str {
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

    /// A short description for an error message: a scalar's value, else its kind (never the
    /// whole of a shared structure, which may print exponentially long).
    pub fn describe(&self) -> String {
        match self {
            Value::Bool(b) => format!("{b}"),
            Value::Int(i) => format!("{i}"),
            Value::Float(f) => format!("{f}"),
            Value::Str(s) if s.len() <= 80 => format!("{s:?}"),
            v => format!("a {}", v.kind()),
        }
    }

    /// Whether this is the string `s`.
    pub fn is_str(&self, s: &str) -> bool {
        matches!(self, Value::Str(v) if &**v == s)
    }

    /// The address of a shared container (tests check sharing with it).
    #[cfg(test)]
    fn address(&self) -> *const Node<Value> {
        match self {
            Value::Tuple(t) | Value::List(t) => Rc::as_ptr(t),
            _ => std::ptr::null(),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Value::Tuple(n) | Value::List(n) => n.depth,
            Value::Dict(n) => n.depth,
            _ => 0,
        }
    }

    fn tuple(items: Vec<Value>) -> Result<Value> {
        Ok(Value::Tuple(node(items, Value::depth)?))
    }
}

fn pair_depth(p: &(Value, Value)) -> usize {
    p.0.depth().max(p.1.depth())
}

fn check_depth(depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("the pickle nests containers deeper than {MAX_DEPTH} levels");
    }
    Ok(())
}

/// A container of `items`, refused if it nests too deep.
fn node<T>(items: Vec<T>, depth_of: impl Fn(&T) -> usize) -> Result<Rc<Node<T>>> {
    let depth = 1 + items.iter().map(depth_of).max().unwrap_or(0);
    check_depth(depth)?;
    Ok(Rc::new(Node { depth, items }))
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
        _ => bail!(
            "{what}: expected a non-negative int, found {}",
            v.describe()
        ),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(xs) | Value::List(xs) if xs.items.len() > MAX_DIMS => bail!(
            "{what}: {} dimensions, more than the {MAX_DIMS} a tensor may have",
            xs.items.len()
        ),
        Value::Tuple(xs) | Value::List(xs) => xs.items.iter().map(|x| as_usize(x, what)).collect(),
        _ => bail!("{what}: expected a tuple of ints, found {}", v.kind()),
    }
}

fn as_str(v: &Value, what: &str) -> Result<Rc<str>> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        _ => bail!("{what}: expected a string, found {}", v.kind()),
    }
}

/// Interprets a persistent id `('storage', storage_type, key, location, numel[, view_metadata])`.
fn storage_from_pid(pid: &Value) -> Result<Value> {
    let Value::Tuple(t) = pid else {
        bail!("persistent id is a {}, not a tuple", pid.kind());
    };
    let t = &t.items;
    if t.len() < 5 || !t[0].is_str("storage") {
        bail!("persistent id is not a ('storage', …) tuple");
    }
    let Value::Global(Global::Storage(dtype)) = t[1] else {
        bail!(
            "persistent id names a {} instead of a storage type",
            t[1].kind()
        );
    };
    let key = match &t[2] {
        Value::Int(i) => i.to_string().into(),
        v => as_str(v, "storage key")?,
    };
    let numel = as_usize(&t[4], "storage size")?;
    let view_offset = match t.get(5) {
        None | Some(Value::None) => 0,
        // Legacy views: (view_key, offset, view_size) into the storage `key`.
        Some(Value::Tuple(v)) if v.items.len() == 3 => {
            as_usize(&v.items[1], "storage view offset")?
        }
        Some(v) => bail!("unexpected storage view metadata ({})", v.kind()),
    };
    Ok(Value::Storage(Rc::new(StorageRef {
        key,
        dtype,
        numel,
        view_offset,
    })))
}

fn reduce(f: Value, args: Value) -> Result<Value> {
    let Value::Global(g) = f else {
        bail!("REDUCE on a {}, not a class or function", f.kind());
    };
    let Value::Tuple(a) = args else {
        bail!("REDUCE arguments are a {}, not a tuple", args.kind());
    };
    let a = &a.items;
    match g {
        Global::OrderedDict if a.is_empty() => Ok(Value::Dict(node(Vec::new(), pair_depth)?)),
        Global::RebuildTensor | Global::RebuildTensorV2 if a.len() >= 4 => {
            let Value::Storage(storage) = &a[0] else {
                bail!("tensor built from a {}, not a storage", a[0].kind());
            };
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: (**storage).clone(),
                offset: as_usize(&a[1], "tensor storage offset")?,
                size: as_usizes(&a[2], "tensor size")?,
                stride: as_usizes(&a[3], "tensor stride")?,
            })))
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
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
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
    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .context("string is not UTF-8")?
                .into(),
        ))
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

/// Values built so far, against [`MAX_VALUES`].
struct Budget(usize);

impl Budget {
    fn charge(&mut self, n: usize) -> Result<()> {
        self.0 = self.0.saturating_add(n);
        if self.0 > MAX_VALUES {
            bail!("the pickle builds more than {MAX_VALUES} values (a memo bomb?)");
        }
        Ok(())
    }
}

/// Appends `items` to a container, copying it first if it is shared (the copy is charged).
fn extend<T: Clone>(
    node: &mut Rc<Node<T>>,
    items: Vec<T>,
    depth_of: impl Fn(&T) -> usize,
    budget: &mut Budget,
) -> Result<()> {
    if Rc::strong_count(node) > 1 {
        budget.charge(node.items.len())?;
    }
    let n = Rc::make_mut(node);
    for item in items {
        n.depth = n.depth.max(1 + depth_of(&item));
        n.items.push(item);
    }
    check_depth(n.depth)
}

/// The pickle machine: its stack, marks and memo.
struct Machine<'a> {
    r: Reader<'a>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    budget: Budget,
}

/// Reads one pickle from the start of `data`. Returns the object and the bytes consumed
/// (legacy `.pth` files hold several pickles back to back).
pub fn read(data: &[u8]) -> Result<(Value, usize)> {
    let mut m = Machine {
        r: Reader { data, pos: 0 },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        budget: Budget(0),
    };
    loop {
        let at = m.r.pos;
        let op = m.r.u8()?;
        m.step(op)
            .with_context(|| format!("pickle opcode 0x{op:02x} at byte {at}"))?;
        if op == b'.' {
            let v = m.pop().context("pickle STOP with an empty stack")?;
            return Ok((v, m.r.pos));
        }
    }
}

impl Machine<'_> {
    fn push(&mut self, v: Value) -> Result<()> {
        self.budget.charge(1)?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("pickle MARK missing")?;
        if m > self.stack.len() {
            bail!("pickle MARK beyond the stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.stack.last_mut() {
            Some(Value::List(l)) => extend(l, items, Value::depth, &mut self.budget),
            _ => bail!("APPEND on something that is not a list"),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("SETITEMS with an odd number of items");
        }
        let mut it = items.into_iter();
        let mut pairs = Vec::with_capacity(it.len() / 2);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match self.stack.last_mut() {
            Some(Value::Dict(d)) => extend(d, pairs, pair_depth, &mut self.budget),
            _ => bail!("SETITEM on something that is not a dict"),
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        let r = &mut self.r;
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
            b'(' => {
                self.budget.charge(1)?;
                self.marks.push(self.stack.len());
            }
            b'}' => self.push(Value::Dict(node(Vec::new(), pair_depth)?))?,
            b']' => self.push(Value::List(node(Vec::new(), Value::depth)?))?,
            b')' => self.push(Value::tuple(Vec::new())?)?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::tuple(items)?)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::tuple(items)?)?;
            }
            // Python 2 `str` (BINSTRING, SHORT_BINSTRING): torch.load decodes it as UTF-8.
            b'X' | b'T' => {
                let n = r.u32()? as usize;
                let v = r.string(n)?;
                self.push(v)?;
            }
            0x8c | b'U' => {
                let n = r.u8()? as usize;
                let v = r.string(n)?;
                self.push(v)?;
            }
            0x8d => {
                let n = usize::try_from(r.u64()?)?;
                let v = r.string(n)?;
                self.push(v)?;
            }
            b'B' => {
                let n = r.u32()? as usize;
                let v = Value::Bytes(r.take(n)?.into());
                self.push(v)?;
            }
            b'C' => {
                let n = r.u8()? as usize;
                let v = Value::Bytes(r.take(n)?.into());
                self.push(v)?;
            }
            b'J' => {
                let v = r.u32()? as i32 as i128;
                self.push(Value::Int(v))?;
            }
            b'K' => {
                let v = r.u8()? as i128;
                self.push(Value::Int(v))?;
            }
            b'M' => {
                let v = r.u16()? as i128;
                self.push(Value::Int(v))?;
            }
            0x8a => {
                let n = r.u8()? as usize;
                let v = long(r.take(n)?)?;
                self.push(Value::Int(v))?;
            }
            0x8b => {
                let n = r.u32()? as usize;
                let v = long(r.take(n)?)?;
                self.push(Value::Int(v))?;
            }
            b'G' => {
                let v = f64::from_be_bytes(r.array()?);
                self.push(Value::Float(v))?;
            }
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'N' => self.push(Value::None)?,
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = self
                    .memo
                    .get(&i)
                    .with_context(|| format!("memo {i} unset"))?;
                self.push(v.clone())?;
            }
            b'q' | b'r' | 0x94 => {
                let i = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => self.memo.len() as u32,
                };
                let v = self.stack.last().context("memoize on an empty stack")?;
                self.memo.insert(i, v.clone());
                self.budget.charge(1)?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                self.push(Value::Global(resolve_global(module, name)?))?;
            }
            0x93 => {
                let name = as_str(&self.pop()?, "STACK_GLOBAL name")?;
                let module = as_str(&self.pop()?, "STACK_GLOBAL module")?;
                self.push(Value::Global(resolve_global(&module, &name)?))?;
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                self.push(reduce(f, args)?)?;
            }
            b'b' => {
                // Object state (an OrderedDict's `_metadata`, a tensor's extra attributes):
                // nothing mura needs.
                let _state = self.pop()?;
                match self.stack.last() {
                    Some(Value::Dict(_)) | Some(Value::Tensor(_)) => {}
                    Some(v) => bail!("BUILD on a {}", v.kind()),
                    None => bail!("pickle stack underflow"),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(storage_from_pid(&pid)?)?;
            }
            _ => bail!("unsupported pickle opcode (not one torch.save writes for a state dict)"),
        }
        Ok(())
    }
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
        let d = &d.items;
        assert_eq!(d[0], (Value::Str("a".into()), Value::Int(1)));
        assert_eq!(d[1], (Value::Str("bb".into()), Value::Int(-2)));
        assert_eq!(d[2].1, Value::Int(0x1950a86a20f9469cfc6c));
        assert_eq!(d[3].1, Value::Float(1.5));
        let Value::List(l) = &d[4].1 else { panic!() };
        assert_eq!(l.items, [Value::Bool(true), Value::None]);
    }

    /// `[]` memoised, then `n` rounds of memo[0] = (memo[0], memo[0]): 2^n leaves in 7n bytes.
    fn doubling(n: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..n {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn memo_reads_share_instead_of_copying() {
        let (v, _) = read(&doubling(60)).unwrap();
        let (mut v, mut depth) = (v, 0);
        while let Value::Tuple(t) = v {
            assert_eq!(t.items[0].address(), t.items[1].address());
            v = t.items[0].clone();
            depth += 1;
        }
        assert_eq!(depth, 60);
        // The message names kinds, never a printout of 2^60 leaves.
        assert_eq!(read(&doubling(60)).unwrap().0.describe(), "a tuple");
    }

    #[test]
    fn nesting_and_size_are_capped() {
        let e = format!("{:#}", read(&doubling(MAX_DEPTH + 5)).unwrap_err());
        assert!(e.contains("deeper than 100 levels"), "{e}");
        // 200,000 nested lists, each appended to the one below: refused at depth 101, and
        // nothing deep is ever built, so dropping cannot exhaust the stack.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'.');
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("deeper than 100 levels"), "{e}");
        // A list copied by every append while the memo shares it: quadratic, so capped.
        let mut p = vec![0x80, 2, b']', b'('];
        p.extend(std::iter::repeat_n(b'N', 100_000));
        p.extend([b'e', b'q', 0]);
        for _ in 0..100 {
            p.extend([b'h', 0, b'N', b'a']);
        }
        p.push(b'.');
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("more than 4194304 values"), "{e}");
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
