//! PNG decoding to gray, resizing, and the preprocessing ([`Preprocess`]) shared by `prep` and
//! `predict`.

use anyhow::{bail, Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Decodes a view to gray in [0, 1]: a DICOM file (the `DICM` magic at byte 128, whatever its
/// name; [`super::dicom`] says what is read), else a PNG (8 or 16 bit; gray, gray+alpha, RGB,
/// RGBA or palette). RGB uses PIL's `L` weights (0.299, 0.587, 0.114); alpha is ignored, as PIL
/// does.
pub fn decode_gray(path: &Path) -> Result<GrayImage> {
    let cap = MAX_PNG_FILE_BYTES.max(super::dicom::MAX_DICOM_FILE_BYTES);
    let bytes = crate::disk::read_regular(path, cap)?;
    decode_view_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

/// As [`decode_gray`], from a file's bytes: DICOM when they have the `DICM` magic, else PNG.
pub fn decode_view_bytes(bytes: &[u8]) -> Result<GrayImage> {
    if super::dicom::is_dicom(bytes) {
        super::dicom::decode_gray_bytes(bytes)
    } else {
        decode_gray_bytes(bytes)
    }
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

/// How a PNG becomes a model input, the one way for `prep` (and so training and `eval`) and
/// `predict`: decoded to gray ([`decode_gray`]), made a store image of `store_size`² u8 as
/// [`Resize`] says ([`Preprocess::store_pixels`]), then resampled to the model's input side and
/// normalised as the loader does in evaluation (`ops::augment::image` without augmentation).
/// A checkpoint records the preprocessing it was trained with, which `predict` then runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preprocess {
    /// The store's image side (`prep --size`).
    pub store_size: usize,
    pub resize: Resize,
}

/// How a decoded image becomes a store image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resize {
    /// [`resize_for_store`] (area-averaging by whole factors, then bilinear), rounded to u8.
    #[serde(rename = "area-bilinear-u8")]
    AreaBilinearU8,
}

impl Preprocess {
    /// What `prep --size store_size` does.
    pub fn prep(store_size: usize) -> Preprocess {
        Preprocess {
            store_size,
            resize: Resize::AreaBilinearU8,
        }
    }

    /// `img` as the store holds it: [store_size, store_size] u8.
    pub fn store_pixels(&self, img: GrayImage) -> Vec<u8> {
        match self.resize {
            Resize::AreaBilinearU8 => resize_for_store(img, self.store_size)
                .data
                .iter()
                .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        }
    }

    /// `img` as the model sees it in evaluation: [side, side, 3] f32 (NHWC, one image).
    pub fn model_input(&self, img: GrayImage, side: usize) -> Vec<f32> {
        let pixels = self.store_pixels(img);
        let mut x = vec![0f32; side * side * 3];
        let identity = crate::ops::augment::AugParams::IDENTITY;
        crate::ops::augment::image(&pixels, self.store_size, identity, side, &mut x);
        x
    }
}
