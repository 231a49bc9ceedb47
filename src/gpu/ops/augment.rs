//! Device-side augmentation (kernels/augment.cu), identical to the CPU reference
//! `crate::ops::augment::image` on each image, bit for bit in f32.

use super::Act;
use crate::gpu::error::bail_shape;
use crate::gpu::kernels::launch as k;
use crate::gpu::{blocks_for, Driver, Launch, Nhwc, Slice};
use crate::ops::augment::{normalisation, AugParams};
use anyhow::Result;

/// `out: [n, out_size, out_size, 3]` (normalised NHWC) from the store's `src: [n, s, s]` u8
/// images, image `i` flipped and rotated by `params[i]`. `steps`: scratch of `[n, 4]` f32 for the
/// per-image source steps (uploaded here).
pub fn images<T: Act>(
    d: &dyn Driver,
    src: Slice<u8>,
    src_size: usize,
    params: &[AugParams],
    steps: Slice<f32>,
    out: Nhwc<T>,
) -> Result<()> {
    let n = params.len();
    let (on, out_size, ow, oc) = out.dims();
    if (on, ow, oc, out.rs()) != (n, out_size, 3, 3) {
        bail_shape!(
            "augmenting {n} images into {:?} (a contiguous [{n}, s, s, 3] is needed)",
            out.dims()
        );
    }
    let src = src.expect(n * src_size * src_size, "the source images")?;
    let steps = steps.expect(4 * n, "the augmentation steps")?;
    let host: Vec<f32> = params
        .iter()
        .flat_map(|p| p.steps(src_size, out_size))
        .collect();
    steps.upload(d, &host)?;
    let (a, b) = normalisation();
    let at = Launch::linear(blocks_for(n * out_size, 64), 64);
    let (src, steps) = (src.ptr(), steps.ptr());
    // SAFETY: src, steps and out are checked to hold what the kernel reads and writes.
    unsafe {
        k::augment_fwd::<T>(
            d,
            at,
            out.ptr(),
            src,
            steps,
            n,
            src_size,
            out_size,
            a[0],
            a[1],
            a[2],
            b[0],
            b[1],
            b[2],
        )
    }
}
