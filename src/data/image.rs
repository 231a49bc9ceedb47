//! PNG decoding to gray, resizing and ImageNet normalisation: shared by `prep` and `predict`.

use crate::ops::augment::{MEAN, STD};
use anyhow::{bail, Context, Result};
use image::DynamicImage;
use std::path::Path;

/// The largest image side mura stores or feeds a model (MURA's images are at most 512 px).
pub const MAX_SIDE: usize = 4096;

/// Refuses an image side given as `option` (e.g. `--image-size`) outside 8..=MAX_SIDE, before a
/// huge size turns into a failed allocation.
pub fn check_side(option: &str, side: usize) -> Result<()> {
    if !(8..=MAX_SIDE).contains(&side) {
        bail!("{option} {side} is out of range (8..={MAX_SIDE})");
    }
    Ok(())
}

/// Refuses a PNG with a palette (PLTE chunk) that is not whole RGB entries: png 0.18.1 panics
/// decoding one (image-rs/image-png#694, fixed upstream after that release; found by
/// `fuzz/` and kept in `fuzz/regressions/png/`).
fn check_palettes(bytes: &[u8]) -> Result<()> {
    let mut at = 8usize; // after the signature: chunks of length, type, data, crc
    while let Some(head) = bytes.get(at..at.saturating_add(8)) {
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if &head[4..] == b"PLTE" && !len.is_multiple_of(3) {
            bail!("not a readable PNG: its palette holds {len} bytes, not whole RGB entries");
        }
        at = at.saturating_add(12).saturating_add(len);
    }
    Ok(())
}

/// A single-channel image with values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    /// data: [height, width] f32 in [0, 1], row-major
    pub data: Vec<f32>,
}

/// The widest and tallest PNG decoded (MURA's are at most 512 px): larger ones are refused
/// from their header, before any pixel is inflated.
pub const MAX_PNG_SIDE: u32 = 8192;
/// What the PNG decoder may allocate for one image; the gray copy adds 4 bytes per pixel.
pub const MAX_DECODE_BYTES: u64 = 256 << 20;
/// The largest PNG file read.
pub const MAX_PNG_FILE_BYTES: u64 = 256 << 20;

/// Decodes a PNG (8 or 16 bit; gray, gray+alpha, RGB, RGBA or palette) to gray in [0, 1].
/// RGB uses PIL's `L` weights (0.299, 0.587, 0.114); alpha is ignored, as PIL does.
pub fn decode_gray(path: &Path) -> Result<GrayImage> {
    let bytes = crate::disk::read_regular(path, MAX_PNG_FILE_BYTES)?;
    decode_gray_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

/// As [`decode_gray`], from the bytes of a PNG file. At most [`MAX_PNG_SIDE`] on a side and
/// [`MAX_DECODE_BYTES`] for the decoder, so a decompression bomb is refused, not inflated.
pub fn decode_gray_bytes(bytes: &[u8]) -> Result<GrayImage> {
    if bytes.is_empty() {
        bail!("empty file (0 bytes)");
    }
    check_palettes(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_PNG_SIDE);
    limits.max_image_height = Some(MAX_PNG_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!(
            "PNG is too large to decode ({e}; mura decodes at most {MAX_PNG_SIDE}x{MAX_PNG_SIDE} \
             pixels and {} MiB)",
            MAX_DECODE_BYTES >> 20
        ),
        e => anyhow::anyhow!("not a readable PNG: {e}"),
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        bail!("image has no pixels ({width}x{height})");
    }
    let rgb = |r: f32, g: f32, b: f32| 0.299 * r + 0.587 * g + 0.114 * b;
    let data: Vec<f32> = match &img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| v as f32 / 255.0).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| p[0] as f32 / 255.0)
            .collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| v as f32 / 65535.0).collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| p[0] as f32 / 65535.0)
            .collect(),
        DynamicImage::ImageRgb8(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| rgb(p[0] as f32, p[1] as f32, p[2] as f32) / 255.0)
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| rgb(p[0] as f32, p[1] as f32, p[2] as f32) / 255.0)
            .collect(),
        DynamicImage::ImageRgb16(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| rgb(p[0] as f32, p[1] as f32, p[2] as f32) / 65535.0)
            .collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| rgb(p[0] as f32, p[1] as f32, p[2] as f32) / 65535.0)
            .collect(),
        other => other
            .to_rgb32f()
            .as_raw()
            .chunks_exact(3)
            .map(|p| rgb(p[0], p[1], p[2]))
            .collect(),
    };
    Ok(GrayImage {
        width,
        height,
        data: data.into_iter().map(|v| v.clamp(0.0, 1.0)).collect(),
    })
}

/// Bilinear resize to `size` x `size` with half-pixel centres (torch `align_corners=False`,
/// no antialiasing). An image already at that size is returned untouched.
pub fn resize_bilinear(img: GrayImage, size: usize) -> GrayImage {
    if img.width == size && img.height == size {
        return img;
    }
    // One axis' source taps: (index0, index1, weight of index1), as torch computes them.
    fn taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
        let scale = src as f32 / dst as f32;
        (0..dst)
            .map(|d| {
                let s = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (s as usize).min(src - 1);
                let i1 = if i0 < src - 1 { i0 + 1 } else { i0 };
                (i0, i1, s - i0 as f32)
            })
            .collect()
    }
    let xs = taps(img.width, size);
    let ys = taps(img.height, size);
    let w = img.width;
    let mut data = Vec::with_capacity(size * size);
    for &(y0, y1, ly) in &ys {
        let (r0, r1) = (
            &img.data[y0 * w..(y0 + 1) * w],
            &img.data[y1 * w..(y1 + 1) * w],
        );
        for &(x0, x1, lx) in &xs {
            let top = r0[x0] + (r0[x1] - r0[x0]) * lx;
            let bot = r1[x0] + (r1[x1] - r1[x0]) * lx;
            data.push(top + (bot - top) * ly);
        }
    }
    GrayImage {
        width: size,
        height: size,
        data,
    }
}

/// Area-averages by whole factors while the image is at least twice `size` on an axis, then
/// resizes bilinearly to `size` x `size`: what `prep` does, so large shrinks do not alias.
pub fn resize_for_store(img: GrayImage, size: usize) -> GrayImage {
    let fx = (img.width / size).max(1);
    let fy = (img.height / size).max(1);
    if fx == 1 && fy == 1 {
        return resize_bilinear(img, size);
    }
    let (ow, oh) = (img.width.div_ceil(fx), img.height.div_ceil(fy));
    let mut data = vec![0f32; ow * oh];
    for oy in 0..oh {
        let ys = oy * fy..((oy + 1) * fy).min(img.height);
        for ox in 0..ow {
            let xs = ox * fx..((ox + 1) * fx).min(img.width);
            let mut sum = 0f32;
            for y in ys.clone() {
                sum += img.data[y * img.width + xs.start..y * img.width + xs.end]
                    .iter()
                    .sum::<f32>();
            }
            data[oy * ow + ox] = sum / (ys.len() * xs.len()) as f32;
        }
    }
    resize_bilinear(
        GrayImage {
            width: ow,
            height: oh,
            data,
        },
        size,
    )
}

/// Writes gray values in [0, 1] as the network's input: the gray value in all three channels,
/// each normalised by ImageNet's mean and std.
// gray: [s*s] f32 in [0, 1]; out: [s, s, 3] f32 (NHWC, one image)
pub fn normalize_to_input(gray: &[f32], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        gray.len() * 3,
        "normalize_to_input: out must be 3x gray"
    );
    for (o, &g) in out.chunks_exact_mut(3).zip(gray) {
        for c in 0..3 {
            o[c] = (g - MEAN[c]) / STD[c];
        }
    }
}
