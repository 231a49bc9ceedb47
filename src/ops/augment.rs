//! Training-time augmentation of a stored u8 image into a network input (the CPU reference of
//! kernels/augment.cu): horizontal flip, rotation about the centre, bilinear resample with
//! half-pixel centres (outside the source: black), ImageNet normalisation into 3 channels.

/// ImageNet's per-channel mean and standard deviation, for inputs in [0, 1].
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The normalisation of a u8 value `v` into channel `c`: `v · a[c] + b[c]` = `(v / 255 − MEAN) / STD`.
pub fn normalisation() -> ([f32; 3], [f32; 3]) {
    (
        std::array::from_fn(|c| 1.0 / (255.0 * STD[c])),
        std::array::from_fn(|c| -MEAN[c] / STD[c]),
    )
}

/// How one image is augmented: flipped first, then rotated about its centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugParams {
    pub flip: bool,
    /// Counter-clockwise, in degrees.
    pub angle_deg: f32,
}

impl AugParams {
    pub const IDENTITY: AugParams = AugParams {
        flip: false,
        angle_deg: 0.0,
    };

    /// The source step per output column and per output row, `[dux, dvx, duy, dvy]`, for an
    /// `out_size`² output of a `src_size`² source: source position = centre + scale · R(angle) ·
    /// (output position − centre), u mirrored by a flip.
    pub fn steps(self, src_size: usize, out_size: usize) -> [f32; 4] {
        let scale = src_size as f32 / out_size as f32;
        let (sin, cos) = (self.angle_deg.to_radians()).sin_cos();
        let sign = if self.flip { -1.0 } else { 1.0 };
        [
            sign * scale * cos,
            -scale * sin,
            sign * scale * sin,
            scale * cos,
        ]
    }
}

/// Resamples a stored image into a network input: flip, rotate by `angle_deg` about the centre,
/// bilinear resample to `out_size`² with half-pixel centres, pixels outside the source black
/// (0), then ImageNet normalisation into 3 channels. With no flip, angle 0 and equal sizes it
/// reproduces the source exactly; a flip alone is an exact mirror.
// src: [src_size, src_size] u8; out: [out_size, out_size, 3] f32 (NHWC, one image)
pub fn image(src: &[u8], src_size: usize, p: AugParams, out_size: usize, out: &mut [f32]) {
    assert_eq!(src.len(), src_size * src_size, "augment::image: src shape");
    assert_eq!(
        out.len(),
        out_size * out_size * 3,
        "augment::image: out shape"
    );
    let [dux, dvx, duy, dvy] = p.steps(src_size, out_size);
    let half_out = out_size as f32 / 2.0;
    let c_src = src_size as f32 / 2.0 - 0.5;
    let (lo, hi) = (-0.5f32, src_size as f32 - 0.5);
    let last = (src_size - 1) as f32;
    let (a, b) = normalisation();
    for (y, row) in out.chunks_exact_mut(out_size * 3).enumerate() {
        let cy = y as f32 + 0.5 - half_out;
        let cx0 = 0.5 - half_out;
        let mut u = c_src + dux * cx0 + duy * cy;
        let mut v = c_src + dvx * cx0 + dvy * cy;
        for o in row.chunks_exact_mut(3) {
            let val = if u >= lo && u <= hi && v >= lo && v <= hi {
                let (uc, vc) = (u.clamp(0.0, last), v.clamp(0.0, last));
                let (x0, y0) = (uc as usize, vc as usize);
                let (fx, fy) = (uc - x0 as f32, vc - y0 as f32);
                // The right and lower neighbours, or the pixel itself on the last column / row.
                let i = y0 * src_size + x0;
                let dx = usize::from(x0 + 1 < src_size);
                let dy = if y0 + 1 < src_size { src_size } else { 0 };
                let (p00, p01) = (src[i] as f32, src[i + dx] as f32);
                let (p10, p11) = (src[i + dy] as f32, src[i + dy + dx] as f32);
                let top = p00 + (p01 - p00) * fx;
                let bot = p10 + (p11 - p10) * fx;
                top + (bot - top) * fy
            } else {
                0.0
            };
            o[0] = val * a[0] + b[0];
            o[1] = val * a[1] + b[1];
            o[2] = val * a[2] + b[2];
            u += dux;
            v += dvx;
        }
    }
}
