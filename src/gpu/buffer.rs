//! Device memory as the ops see it: typed buffers that free themselves, and typed views of them
//! that carry their extent. A launcher takes views, checks that every element its kernel will
//! touch at the launch's shapes lies inside them, and only then launches: a shape that exceeds its
//! buffer is an error, not an out-of-bounds access.
//!
//! - [`Ptr<T>`]: a typed device address, what a kernel's `T*` parameter receives.
//! - [`Slice<T>`]: `len` elements of a buffer (a per-channel vector, a flat parameter range).
//! - [`Mat<T>`]: a `[rows, cols]` matrix with row stride `rs >= cols` inside a slice: activations
//!   as `[n·h·w, c]`, and a channel slice `[c0, c0 + c)` of a dense block's wider buffer.
//! - [`Nhwc<T>`]: a `Mat` with its `n, h, w` (rows = n·h·w), for convolutions and pools.

use super::{DevPtr, Driver, Error};
use crate::gpu::error::bail_shape;
use crate::precision::Precision;
use anyhow::{Context, Result};
use bytemuck::Pod;
use half::bf16;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// An activation storage type: f32, or bf16 with f32 accumulation.
pub trait Act: Pod + Send + Sync + fmt::Debug + 'static {
    const PRECISION: Precision;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Act for f32 {
    const PRECISION: Precision = Precision::F32;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Act for bf16 {
    const PRECISION: Precision = Precision::Bf16;
    /// Rounded once, to nearest even: through f32 rounded to odd (24 bits, 2 more than bf16's
    /// 8 need), which never makes a tie that `v` was not.
    fn from_f64(v: f64) -> bf16 {
        let f = v as f32;
        if !f.is_finite() || f as f64 == v {
            return bf16::from_f32(f);
        }
        // `f` is `v` rounded to nearest; step back to the truncation toward zero, then make it odd.
        let mut bits = f.to_bits();
        if (f as f64).abs() > v.abs() {
            bits -= 1;
        }
        bf16::from_f32(f32::from_bits(bits | 1))
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// A typed device address (null for an absent optional operand). `repr(transparent)`: it is
/// passed to a kernel exactly as a `CUdeviceptr`.
#[repr(transparent)]
pub struct Ptr<T> {
    addr: DevPtr,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Ptr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ptr<T> {}

impl<T> fmt::Debug for Ptr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ptr({:#x})", self.addr)
    }
}

impl<T> Ptr<T> {
    pub const NULL: Ptr<T> = Ptr {
        addr: 0,
        _t: PhantomData,
    };
    pub fn addr(self) -> DevPtr {
        self.addr
    }
}

/// A typed device buffer of `len` elements that frees itself.
pub struct DeviceBuffer<T: Pod> {
    ptr: DevPtr,
    len: usize,
    driver: Arc<dyn Driver>,
    _t: PhantomData<T>,
}

impl<T: Pod> DeviceBuffer<T> {
    /// Uninitialised (as on a GPU: the emulator's memory is not zeroed either).
    pub fn alloc(driver: &Arc<dyn Driver>, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::OutOfMemory {
                what: format!("a device buffer of {len} elements is too large"),
            })?;
        let ptr = driver.alloc(bytes)?;
        Ok(Self {
            ptr,
            len,
            driver: driver.clone(),
            _t: PhantomData,
        })
    }
    /// Every byte zero.
    pub fn zeroed(driver: &Arc<dyn Driver>, len: usize) -> Result<Self> {
        let buf = Self::alloc(driver, len)?;
        buf.fill_bytes(0)?;
        Ok(buf)
    }
    pub fn from_slice(driver: &Arc<dyn Driver>, data: &[T]) -> Result<Self> {
        let buf = Self::alloc(driver, data.len())?;
        buf.copy_from(data)?;
        Ok(buf)
    }
    pub fn copy_from(&self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            bail_shape!(
                "copy of {} elements into a device buffer of {}",
                data.len(),
                self.len
            );
        }
        self.driver.htod(self.ptr, bytemuck::cast_slice(data))
    }
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        self.driver
            .dtoh(bytemuck::cast_slice_mut(&mut v), self.ptr)?;
        Ok(v)
    }
    /// Every byte set to `byte` (0: zeros; 0xff: NaN for f32 and bf16).
    pub fn fill_bytes(&self, byte: u8) -> Result<()> {
        self.driver
            .memset(self.ptr, byte, self.len * size_of::<T>())
    }
    /// The whole buffer as a view.
    pub fn slice(&self) -> Slice<T> {
        Slice {
            addr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    pub fn ptr(&self) -> Ptr<T> {
        self.slice().ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        let _ = self.driver.free(self.ptr);
    }
}

/// `len` elements of `T` on the device: a buffer or a part of one, valid while its buffer lives.
pub struct Slice<T> {
    addr: DevPtr,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Slice<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Slice<T> {}

impl<T> fmt::Debug for Slice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slice({:#x}, {} elements)", self.addr, self.len)
    }
}

impl<T> Slice<T> {
    pub fn ptr(self) -> Ptr<T> {
        Ptr {
            addr: self.addr,
            _t: PhantomData,
        }
    }
    pub fn len(self) -> usize {
        self.len
    }
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
    /// Elements `[start, start + len)`.
    pub fn range(self, start: usize, len: usize) -> Result<Slice<T>> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(Slice {
                addr: self.addr + (start * size_of::<T>()) as u64,
                len,
                _t: PhantomData,
            }),
            _ => bail_shape!(
                "elements {start}..{start}+{len} are outside a device slice of {}",
                self.len
            ),
        }
    }
    /// `data` into the first `data.len()` elements (the rest untouched).
    pub fn upload(self, d: &dyn Driver, data: &[T]) -> Result<()>
    where
        T: Pod,
    {
        let dst = self.range(0, data.len())?;
        d.htod(dst.addr, bytemuck::cast_slice(data))
    }
    /// The first `out.len()` elements into `out`.
    pub fn download(self, d: &dyn Driver, out: &mut [T]) -> Result<()>
    where
        T: Pod,
    {
        let src = self.range(0, out.len())?;
        d.dtoh(bytemuck::cast_slice_mut(out), src.addr)
    }
    /// Refuses a slice of fewer than `len` elements, naming the operand `what`.
    pub fn expect(self, len: usize, what: &str) -> Result<Slice<T>> {
        if self.len < len {
            bail_shape!("{what}: {} elements where {len} are needed", self.len);
        }
        Ok(self)
    }
}

/// A row-major `[rows, cols]` matrix inside a slice, rows `rs >= cols` elements apart.
pub struct Mat<T> {
    slice: Slice<T>,
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<T> Clone for Mat<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Mat<T> {}

impl<T> fmt::Debug for Mat<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, c, rs) = (self.rows, self.cols, self.rs);
        write!(f, "Mat([{r}, {c}] rs {rs} in {:?})", self.slice)
    }
}

/// Elements a `[rows, cols]` matrix with row stride `rs` spans (None on overflow).
fn span(rows: usize, cols: usize, rs: usize) -> Option<usize> {
    match rows == 0 || cols == 0 {
        true => Some(0),
        false => (rows - 1).checked_mul(rs)?.checked_add(cols),
    }
}

impl<T> Mat<T> {
    /// Refuses a stride shorter than a row, and a matrix that does not fit in `slice`.
    pub fn new(slice: Slice<T>, rows: usize, cols: usize, rs: usize) -> Result<Mat<T>> {
        if rs < cols {
            bail_shape!("a row stride of {rs} is shorter than a row of {cols}");
        }
        match span(rows, cols, rs) {
            Some(need) if need <= slice.len => Ok(Mat {
                slice,
                rows,
                cols,
                rs,
            }),
            _ => bail_shape!(
                "a [{rows}, {cols}] matrix with row stride {rs} does not fit in a device slice of {}",
                slice.len
            ),
        }
    }
    /// Rows back to back (`rs = cols`).
    pub fn dense(slice: Slice<T>, rows: usize, cols: usize) -> Result<Mat<T>> {
        Mat::new(slice, rows, cols, cols)
    }
    /// Columns `[c0, c0 + c)` of every row: a channel slice.
    pub fn cols_range(self, c0: usize, c: usize) -> Result<Mat<T>> {
        if c0.checked_add(c).is_none_or(|end| end > self.cols) {
            bail_shape!("columns {c0}..{c0}+{c} of a matrix of {}", self.cols);
        }
        let slice = self.slice.range(c0, self.slice.len - c0)?;
        Mat::new(slice, self.rows, c, self.rs)
    }
    pub fn rows(self) -> usize {
        self.rows
    }
    pub fn cols(self) -> usize {
        self.cols
    }
    pub fn rs(self) -> usize {
        self.rs
    }
    pub fn ptr(self) -> Ptr<T> {
        self.slice.ptr()
    }
    pub fn slice(self) -> Slice<T> {
        self.slice
    }
}

/// An NHWC activation `[n, h, w, c]`: the matrix `[n·h·w, c]` (row stride `rs`) with its `n, h, w`
/// (checked together at construction, so the fields are private).
pub struct Nhwc<T> {
    n: usize,
    h: usize,
    w: usize,
    mat: Mat<T>,
}

impl<T> Clone for Nhwc<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Nhwc<T> {}

impl<T> fmt::Debug for Nhwc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, h, w, c) = (self.n, self.h, self.w, self.mat.cols);
        write!(
            f,
            "Nhwc([{n}, {h}, {w}, {c}] rs {} in {:?})",
            self.mat.rs, self.mat.slice
        )
    }
}

impl<T> Nhwc<T> {
    /// `[n, h, w, c]` at row stride `rs` inside `slice`.
    pub fn new(
        slice: Slice<T>,
        (n, h, w, c): (usize, usize, usize, usize),
        rs: usize,
    ) -> Result<Self> {
        let rows = n
            .checked_mul(h)
            .and_then(|r| r.checked_mul(w))
            .with_context(|| format!("[{n}, {h}, {w}, {c}] is too large"))?;
        Ok(Nhwc {
            n,
            h,
            w,
            mat: Mat::new(slice, rows, c, rs)?,
        })
    }
    /// Channels `[c0, c0 + c)`.
    pub fn channels(self, c0: usize, c: usize) -> Result<Nhwc<T>> {
        Ok(Nhwc {
            mat: self.mat.cols_range(c0, c)?,
            ..self
        })
    }
    pub fn mat(self) -> Mat<T> {
        self.mat
    }
    pub fn n(self) -> usize {
        self.n
    }
    pub fn h(self) -> usize {
        self.h
    }
    pub fn w(self) -> usize {
        self.w
    }
    pub fn c(self) -> usize {
        self.mat.cols
    }
    pub fn rs(self) -> usize {
        self.mat.rs
    }
    pub fn rows(self) -> usize {
        self.mat.rows
    }
    pub fn ptr(self) -> Ptr<T> {
        self.mat.ptr()
    }
    /// `(n, h, w, c)`.
    pub fn dims(self) -> (usize, usize, usize, usize) {
        (self.n, self.h, self.w, self.mat.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(len: usize) -> Slice<f32> {
        Slice {
            addr: 0x1000,
            len,
            _t: PhantomData,
        }
    }

    /// bf16 from f64 is rounded once: against the exact midpoints between neighbouring bf16s.
    #[test]
    fn bf16_from_f64_rounds_once_to_nearest_even() {
        let mut rng = crate::rng::Rng::new(3);
        for i in 0..20_000 {
            let v = match i % 4 {
                // Just above and below a tie: what rounding through f32 to nearest gets wrong.
                0 | 1 => {
                    let b = bf16::from_f32(rng.normal() as f32 * 100.0);
                    let up = bf16::from_bits(b.to_bits().wrapping_add(1));
                    let mid = (b.to_f64() + up.to_f64()) / 2.0;
                    mid * (1.0 + if i % 4 == 0 { 1e-12 } else { -1e-12 })
                }
                2 => rng.normal() * 1e-39, // subnormal
                _ => rng.normal() * 1e30,
            };
            let got = <bf16 as Act>::from_f64(v);
            let bits = got.to_bits();
            // Neither neighbour is nearer; at a tie (never drawn exactly) the even one wins.
            for nb in [bits.wrapping_sub(1), bits.wrapping_add(1)] {
                let other = bf16::from_bits(nb).to_f64();
                if other.is_nan() {
                    continue; // past ±0 in the bit order
                }
                assert!(
                    (got.to_f64() - v).abs() <= (other - v).abs(),
                    "{v:e} rounded to {got}, but {other:e} is nearer"
                );
            }
        }
    }

    #[test]
    fn views_refuse_what_exceeds_their_slice() {
        // [3, 4] with stride 6 spans 2*6 + 4 = 16 elements.
        assert!(Mat::new(slice(16), 3, 4, 6).is_ok());
        assert!(Mat::new(slice(15), 3, 4, 6).is_err());
        assert!(Mat::new(slice(100), 3, 7, 6).is_err()); // stride shorter than a row
        assert!(Mat::new(slice(100), usize::MAX, 4, 6).is_err()); // overflow
        let m = Mat::new(slice(16), 3, 4, 6).unwrap();
        let c = m.cols_range(1, 3).unwrap();
        assert_eq!((c.ptr().addr(), c.cols(), c.rs()), (0x1004, 3, 6));
        assert!(m.cols_range(2, 3).is_err());
        assert!(slice(8).range(5, 4).is_err());
        assert_eq!(slice(8).range(5, 3).unwrap().ptr().addr(), 0x1000 + 20);
        let x = Nhwc::new(slice(2 * 3 * 5 * 8), (2, 3, 5, 6), 8).unwrap();
        assert_eq!((x.rows(), x.c(), x.channels(4, 2).unwrap().c()), (30, 6, 2));
        assert!(x.channels(7, 2).is_err()); // beyond the view's 6 channels
        assert!(Nhwc::new(slice(10), (2, 3, 5, 6), 8).is_err());
    }
}
