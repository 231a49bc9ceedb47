//! Class activation map overlays (as in the MURA paper's figures).

use crate::data::image::GrayImage;
use anyhow::{bail, Result};
use std::path::Path;

/// A class activation map: `Σ_c w_c·F_c` over the final feature map `F` with the classifier's
/// weights `w`, `[h, w]` row-major, at the feature map's resolution (any scale).
#[derive(Clone, Debug)]
pub struct Cam {
    pub map: Vec<f32>,
    pub w: usize,
    pub h: usize,
}

impl Cam {
    /// The map of `features: [h, w, c]` (NHWC of one image) under the classifier's `weights: [c]`.
    pub fn of(weights: &[f32], features: &[f32], (h, w): (usize, usize)) -> Cam {
        let c = weights.len();
        let map = (0..h * w)
            .map(|p| {
                weights
                    .iter()
                    .zip(&features[p * c..][..c])
                    .map(|(a, f)| a * f)
                    .sum()
            })
            .collect();
        Cam { map, w, h }
    }
}

/// Blend weight of the heat map over the radiograph.
const ALPHA: f32 = 0.45;

/// The jet colour map: t in [0, 1] → RGB in [0, 1] (blue, cyan, yellow, red).
fn jet(t: f32) -> [f32; 3] {
    let c = |x: f32| (1.5 - (4.0 * t - x).abs()).clamp(0.0, 1.0);
    [c(3.0), c(2.0), c(1.0)]
}

/// Bilinear resize with PyTorch's align_corners=False convention.
/// src: [sh, sw] → returns [h, w]
fn resize_bilinear(src: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    let coord = |d: usize, n_src: usize, n_dst: usize| -> (usize, usize, f32) {
        let s =
            ((d as f32 + 0.5) * n_src as f32 / n_dst as f32 - 0.5).clamp(0.0, (n_src - 1) as f32);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(n_src - 1), s - i0 as f32)
    };
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let (y0, y1, fy) = coord(y, sh, h);
        for x in 0..w {
            let (x0, x1, fx) = coord(x, sw, w);
            let top = src[y0 * sw + x0] * (1.0 - fx) + src[y0 * sw + x1] * fx;
            let bottom = src[y1 * sw + x0] * (1.0 - fx) + src[y1 * sw + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Overlay a class activation map on a radiograph and write it as the new PNG `path` (an
/// existing file is never replaced: see `disk::write_new`).
///
/// The map is upsampled bilinearly to the radiograph's size, min-max normalised to [0, 1] (a
/// flat map becomes 0), jet colour-mapped and blended over the radiograph's intensities.
pub fn write_cam_png(image: &GrayImage, cam: &Cam, path: &Path) -> Result<()> {
    let (gray, w, h) = (&image.data, image.width, image.height);
    let (cam, cw, ch) = (&cam.map, cam.w, cam.h);
    if w == 0 || h == 0 || gray.len() != w * h {
        bail!(
            "CAM overlay: image of {} values is not {w} x {h}",
            gray.len()
        );
    }
    if cw == 0 || ch == 0 || cam.len() != cw * ch {
        bail!(
            "CAM overlay: map of {} values is not {cw} x {ch}",
            cam.len()
        );
    }
    if cam.iter().any(|x| !x.is_finite()) {
        bail!(
            "CAM overlay for {}: the activation map has non-finite values",
            path.display()
        );
    }
    let up = resize_bilinear(cam, cw, ch, w, h);
    let lo = up.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = up.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = if hi > lo { 1.0 / (hi - lo) } else { 0.0 };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for (&g, &c) in gray.iter().zip(&up) {
        let g = g.clamp(0.0, 1.0);
        for k in jet((c - lo) * scale) {
            rgb.push(((1.0 - ALPHA) * g + ALPHA * k).mul_add(255.0, 0.5) as u8);
        }
    }
    crate::disk::write_new(
        path,
        &crate::disk::encode_png(path, &rgb, w as u32, h as u32)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn read_rgb(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    #[test]
    fn overlay_has_image_size_and_follows_the_map() {
        let dir = std::env::temp_dir().join(format!("mura-cam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = Rng::new(3 ^ std::process::id() as u64);
        let (w, h, cw, ch) = (37, 29, 7, 5);
        let gray: Vec<f32> = (0..w * h).map(|_| rng.uniform() as f32).collect();
        // Two maps: hot in the top-left corner, hot in the bottom-right corner.
        let mut a: Vec<f32> = (0..cw * ch).map(|_| rng.range(-1.0, 0.0) as f32).collect();
        let mut b = a.clone();
        a[0] = 5.0;
        b[cw * ch - 1] = 5.0;
        let image = GrayImage {
            width: w,
            height: h,
            data: gray,
        };
        let cam = |map| Cam { map, w: cw, h: ch };
        write_cam_png(&image, &cam(a), &dir.join("a.png")).unwrap();
        write_cam_png(&image, &cam(b), &dir.join("b.png")).unwrap();
        let (ia, ib) = (read_rgb(&dir.join("a.png")), read_rgb(&dir.join("b.png")));
        assert_eq!(ia.dimensions(), (w as u32, h as u32));
        assert_ne!(ia, ib);
        // The hot corner is red-dominated (jet at 1), the far corner blue-dominated.
        let red_minus_blue = |im: &image::RgbImage, x: u32, y: u32| {
            let p = im.get_pixel(x, y);
            p[0] as i32 - p[2] as i32
        };
        let (x1, y1) = (w as u32 - 1, h as u32 - 1);
        assert!(red_minus_blue(&ia, 0, 0) > 50 && red_minus_blue(&ia, x1, y1) < -50);
        assert!(red_minus_blue(&ib, x1, y1) > 50 && red_minus_blue(&ib, 0, 0) < -50);
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn map_is_the_classifier_weighted_sum_of_features() {
        // 2 × 1 pixels of 3 channels.
        let cam = Cam::of(&[1.0, -2.0, 0.5], &[1.0, 2.0, 4.0, -1.0, 0.0, 2.0], (2, 1));
        assert_eq!((cam.map, cam.w, cam.h), (vec![-1.0, 0.0], 1, 2));
    }

    #[test]
    fn bilinear_resize_matches_hand_values_and_bad_input_is_an_error() {
        // 2 → 4 with align_corners=False: source coords -0.25, 0.25, 0.75, 1.25 → 0, .25, .75, 1.
        let up = resize_bilinear(&[0.0, 1.0], 2, 1, 4, 1);
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
        let p = std::env::temp_dir().join("mura-cam-never-written.png");
        let image = |data: &[f32]| GrayImage {
            width: 3,
            height: 3,
            data: data.to_vec(),
        };
        let cam = |map: &[f32]| Cam {
            map: map.to_vec(),
            w: 2,
            h: 2,
        };
        assert!(write_cam_png(&image(&[0.5; 6]), &cam(&[1.0; 4]), &p).is_err());
        let nan = cam(&[1.0, f32::NAN, 0.0, 0.0]);
        assert!(write_cam_png(&image(&[0.5; 9]), &nan, &p).is_err());
        assert!(!p.exists());
    }
}
