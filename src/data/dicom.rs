//! DICOM views to gray: the subset of DICOM Part 10 files `predict` and `prep` read.
//!
//! A file is DICOM when it has the `DICM` magic at byte 128 (after the 128-byte preamble),
//! whatever its name. Read: one frame of 2-D pixels, MONOCHROME1, MONOCHROME2 or RGB
//! (YBR_FULL / YBR_FULL_422 too when JPEG-compressed: the JPEG decoder gives RGB), 8 or 16 bits
//! allocated, 8 to 16 bits stored (high bit = bits stored - 1), unsigned or signed, in the
//! implicit or explicit VR little endian, deflated explicit VR little endian, RLE lossless, JPEG
//! baseline (process 1) or JPEG lossless (process 14, and its selection value 1) transfer
//! syntaxes. Anything else is refused with one line naming what was found.
//!
//! Gray values, as pydicom's `apply_modality_lut` then `apply_windowing` compute them:
//! the stored value `s` (masked to bits stored, sign-extended when signed) becomes
//! `x = s * RescaleSlope + RescaleIntercept` when both are present; then, when the file has a
//! window (the first WindowCenter / WindowWidth value), `y` is that window's VOI LUT function
//! (LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2) on [0, 1], else the image's min–max
//! `y = (x - min) / (max - min)` (an image of one value is all 0); MONOCHROME1 is inverted to
//! MONOCHROME2 (`1 - y`). A Modality or VOI LUT Sequence is not applied (the rescale, window or
//! min–max above is). RGB samples are not rescaled or windowed: gray is PIL's `L` weights
//! (0.299, 0.587, 0.114), as for a PNG, over `2^BitsStored - 1`.
//!
//! Hostile files: the whole file is read with a cap ([`MAX_DICOM_FILE_BYTES`]; a deflated data set
//! is inflated to at most [`MAX_INFLATED_BYTES`]); before dicom-rs parses it, every data element's
//! stated length is checked against the bytes that follow it and its tag against ascending order,
//! with caps on nesting and on the number of elements; rows, columns, frames and samples are checked against a cap and against
//! the pixel data the file holds before anything is allocated for them. RLE is decoded here and
//! JPEG with `jpeg-decoder` directly (what dicom-pixeldata 0.10 calls), after the JPEG's own
//! header is checked against the file's rows, columns and samples: dicom-pixeldata 0.10.1's RLE
//! and JPEG adapters index slices with the file's stated offsets and sizes unchecked (a panic).

use super::image::{GrayImage, MAX_DECODE_BYTES, MAX_PNG_SIDE};
use anyhow::{bail, Context, Result};
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::header::HasLength;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{tags, StandardDataDictionary};
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use std::io::Read;

/// The largest DICOM file read.
pub const MAX_DICOM_FILE_BYTES: u64 = 256 << 20;
/// The most a deflated data set may inflate to.
pub const MAX_INFLATED_BYTES: u64 = 256 << 20;
/// The widest and tallest image read (as for PNG).
pub const MAX_DICOM_SIDE: usize = MAX_PNG_SIDE as usize;
/// What decoding holds at most per sample at once (u32 stored values, then f64 values and the
/// f32 gray): [`MAX_DECODE_BYTES`] over it is the most samples an image may have (16 Mi).
pub const DECODE_BYTES_PER_SAMPLE: u64 = 16;
/// The most data elements (all nesting levels) a file may hold: real files hold hundreds.
pub const MAX_ELEMENTS: usize = 100_000;
/// The deepest nesting of sequences and items.
pub const MAX_DEPTH: usize = 16;

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";
const RLE: &str = "1.2.840.10008.1.2.5";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.57";
const JPEG_LOSSLESS_SV1: &str = "1.2.840.10008.1.2.4.70";

/// Whether `bytes` start as a DICOM Part 10 file: `DICM` at byte 128.
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

/// How the pixel data is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    Native,
    Rle,
    Jpeg,
}

/// The name of a transfer syntax mura does not read, for the error line.
fn syntax_name(uid: &str) -> &'static str {
    match uid {
        "1.2.840.10008.1.2.2" => "Explicit VR Big Endian (retired)",
        "1.2.840.10008.1.2.4.51" => "JPEG Extended (Process 2 & 4)",
        "1.2.840.10008.1.2.4.80" => "JPEG-LS Lossless",
        "1.2.840.10008.1.2.4.81" => "JPEG-LS Near-Lossless",
        "1.2.840.10008.1.2.4.90" => "JPEG 2000 Lossless",
        "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "JPEG 2000 Part 2",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "High-Throughput JPEG 2000"
        }
        "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" | "1.2.840.10008.1.2.4.112" => {
            "JPEG XL"
        }
        "1.2.840.10008.1.2.1.98" => "Encapsulated Uncompressed Explicit VR Little Endian",
        u if u.starts_with("1.2.840.10008.1.2.4.10") => "MPEG video",
        _ => "unknown",
    }
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether an explicit VR header has 2 reserved bytes and a 4-byte length: every VR but the 21
/// of PS3.5 7.1.2 with a 2-byte length, an unknown one too (dicom-rs reads it as UN, so does
/// the walk).
fn long_vr(vr: &[u8]) -> bool {
    !matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// The file meta group (explicit VR little endian, from byte 132): its transfer syntax UID and
/// where the data set starts.
fn read_meta(bytes: &[u8]) -> Result<(String, usize)> {
    let mut pos = 132;
    let mut ts = None;
    let mut group_length = None;
    while bytes.len() >= pos + 8 && u16_le(bytes, pos) == 0x0002 {
        let elem = u16_le(bytes, pos + 2);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, hdr) = if long_vr(vr) {
            if bytes.len() < pos + 12 {
                bail!("DICOM file is truncated in its file meta group");
            }
            (u32_le(bytes, pos + 8) as usize, 12)
        } else {
            (u16_le(bytes, pos + 6) as usize, 8)
        };
        let start = pos + hdr;
        let Some(value) = bytes.get(start..start.saturating_add(len)) else {
            bail!(
                "DICOM file meta element (0002,{elem:04X}) states {len} bytes, the file holds {}",
                bytes.len().saturating_sub(start)
            );
        };
        match elem {
            0x0000 if len == 4 => group_length = Some((u32_le(value, 0) as usize, start + 4)),
            0x0010 => {
                let uid = String::from_utf8_lossy(value);
                ts = Some(uid.trim_end_matches(['\0', ' ']).trim().to_string());
            }
            _ => {}
        }
        pos = start + len;
    }
    if let Some((n, from)) = group_length {
        if from + n != pos {
            bail!(
                "DICOM file meta group states {n} bytes, its elements hold {}",
                pos.saturating_sub(from)
            );
        }
    }
    let ts = ts.context("DICOM file meta group has no transfer syntax UID (0002,0010)")?;
    Ok((ts, pos))
}

/// How a data set's elements state their VRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vrs {
    Explicit,
    Implicit,
}

/// What an open container holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holds {
    /// A sequence: items.
    Items,
    /// An item: elements.
    Elements,
    /// Encapsulated pixel data: items that are fragments, not elements.
    Fragments,
}

/// One open container while walking a data set.
struct Open {
    /// Where a defined-length sequence or item ends; `None`: at its delimiter.
    end: Option<usize>,
    /// How its elements state their VRs (an explicit UN of undefined length holds implicit VR
    /// elements).
    vrs: Vrs,
    holds: Holds,
    /// The tag of its last element: elements come in ascending tag order (PS3.5 7.1), which
    /// dicom-rs relies on (out of order, it allocated 4 GiB on a 698-byte file).
    last: Option<Tag>,
}

/// Checks every data element of `data` (a data set in explicit or implicit VR little endian, as
/// `vrs` says)
/// states a length the bytes after it hold, with at most [`MAX_ELEMENTS`] elements and
/// [`MAX_DEPTH`] levels: so dicom-rs, parsing it next, allocates at most what the file holds.
fn walk(data: &[u8], vrs: Vrs) -> Result<()> {
    let mut w = Walk {
        data,
        vrs,
        pos: 0,
        open: Vec::new(),
        elements: 0,
        top_last: None,
    };
    loop {
        w.close_ended();
        if w.pos >= data.len() {
            return Ok(());
        }
        let tag = w.next_tag()?;
        match tag.0 {
            0xFFFE => w.item_or_delimiter(tag.1)?,
            _ => w.element(tag)?,
        }
    }
}

impl Open {
    fn new(end: Option<usize>, vrs: Vrs, holds: Holds) -> Open {
        Open {
            end,
            vrs,
            holds,
            last: None,
        }
    }
}

/// A walk over a data set: where it is, the containers open around it, and what it has seen.
struct Walk<'a> {
    data: &'a [u8],
    /// How the data set's own elements state their VRs.
    vrs: Vrs,
    pos: usize,
    open: Vec<Open>,
    elements: usize,
    /// The last top-level element's tag.
    top_last: Option<Tag>,
}

impl Walk<'_> {
    /// Closes the defined-length containers that end where the walk is.
    fn close_ended(&mut self) {
        while self
            .open
            .last()
            .is_some_and(|o| o.end.is_some_and(|e| e <= self.pos))
        {
            self.open.pop();
        }
    }

    /// How the elements where the walk is state their VRs.
    fn here_vrs(&self) -> Vrs {
        self.open.last().map_or(self.vrs, |o| o.vrs)
    }

    /// The tag of the element that starts here, within the caps on elements and nesting.
    fn next_tag(&mut self) -> Result<Tag> {
        let left = self.data.len() - self.pos;
        if left < 8 {
            bail!("DICOM data set is truncated: {left} bytes left where an element starts");
        }
        let tag = Tag(u16_le(self.data, self.pos), u16_le(self.data, self.pos + 2));
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            bail!("DICOM data set holds more than {MAX_ELEMENTS} elements; refusing to read it");
        }
        if self.open.len() > MAX_DEPTH {
            bail!("DICOM data set nests sequences deeper than {MAX_DEPTH} levels");
        }
        Ok(tag)
    }

    /// An item (FFFE,E000) or a delimiter (FFFE,E00D / E0DD): inside a sequence, an item of
    /// elements opens; inside encapsulated pixel data, a fragment is skipped.
    fn item_or_delimiter(&mut self, elem: u16) -> Result<()> {
        let (data, at) = (self.data, self.pos);
        let len = u32_le(data, at + 4);
        self.pos += 8;
        let pos = self.pos;
        let vrs = self.here_vrs();
        let in_fragments = self
            .open
            .last()
            .is_some_and(|o| o.holds == Holds::Fragments);
        let top = self
            .open
            .last()
            .map(|o| (o.holds == Holds::Elements, o.end.is_none()));
        match elem {
            0xE000 if top.is_none_or(|(item, _)| item) => {
                bail!("DICOM data set has an item (FFFE,E000) outside a sequence at byte {at}")
            }
            0xE000 if in_fragments || len != u32::MAX => {
                if len as usize > data.len() - pos {
                    bail!(
                        "DICOM item at byte {at} states {len} bytes, the file holds {}",
                        data.len() - pos
                    );
                }
                match in_fragments {
                    true => self.pos += len as usize,
                    false => {
                        self.open
                            .push(Open::new(Some(pos + len as usize), vrs, Holds::Elements))
                    }
                }
            }
            0xE000 => self.open.push(Open::new(None, vrs, Holds::Elements)),
            0xE00D | 0xE0DD => {
                // An item's delimiter closes an item of undefined length, a sequence's a
                // sequence (or pixel data) of undefined length; neither has a value.
                if len != 0 || top != Some((elem == 0xE00D, true)) {
                    bail!(
                        "DICOM data set has an unexpected delimiter (FFFE,{elem:04X}) at byte {at}"
                    );
                }
                self.open.pop();
            }
            _ => bail!("DICOM data set has an unknown item tag (FFFE,{elem:04X})"),
        }
        Ok(())
    }

    /// The VR, stated length and header size of the data element `tag` that starts here.
    fn header(&self, tag: Tag, vrs: Vrs) -> Result<([u8; 2], u32, usize)> {
        let (data, pos, left) = (self.data, self.pos, self.data.len() - self.pos);
        let Tag(group, elem) = tag;
        if vrs == Vrs::Implicit {
            let sq = matches!(
                StandardDataDictionary.by_tag(tag).map(|e| e.vr()),
                Some(VirtualVr::Exact(VR::SQ))
            );
            return Ok((if sq { *b"SQ" } else { *b"UN" }, u32_le(data, pos + 4), 8));
        }
        let vr = [data[pos + 4], data[pos + 5]];
        if !vr.iter().all(|c| c.is_ascii_uppercase()) {
            bail!("DICOM element ({group:04X},{elem:04X}) has no valid VR at byte {pos}");
        }
        if !long_vr(&vr) {
            return Ok((vr, u16_le(data, pos + 6) as u32, 8));
        }
        if left < 12 {
            bail!("DICOM data set is truncated in element ({group:04X},{elem:04X})");
        }
        Ok((vr, u32_le(data, pos + 8), 12))
    }

    /// Refuses `tag` unless it comes after its container's previous element.
    fn check_order(&mut self, tag: Tag) -> Result<()> {
        let last = match self.open.last_mut() {
            Some(o) => &mut o.last,
            None => &mut self.top_last,
        };
        if let Some(prev) = last.replace(tag).filter(|&p| p >= tag) {
            bail!(
                "DICOM data set is out of order: element ({:04X},{:04X}) after ({:04X},{:04X})",
                tag.0,
                tag.1,
                prev.0,
                prev.1
            );
        }
        Ok(())
    }

    /// A data element: its value skipped, or (a sequence) opened.
    fn element(&mut self, tag: Tag) -> Result<()> {
        let vrs = self.here_vrs();
        let (vr, len, hdr) = self.header(tag, vrs)?;
        self.pos += hdr;
        self.check_order(tag)?;
        if len == u32::MAX {
            return self.open_undefined(tag, vr, vrs);
        }
        let (len, left) = (len as usize, self.data.len() - self.pos);
        if len > left {
            bail!(
                "DICOM element ({:04X},{:04X}) states {len} bytes, the file holds {left} after it",
                tag.0,
                tag.1
            );
        }
        match &vr {
            b"SQ" => self
                .open
                .push(Open::new(Some(self.pos + len), vrs, Holds::Items)),
            _ => self.pos += len,
        }
        Ok(())
    }

    /// An element of undefined length: encapsulated pixel data, a sequence, or an UN (which holds
    /// implicit VR elements); any other VR is refused.
    fn open_undefined(&mut self, tag: Tag, vr: [u8; 2], vrs: Vrs) -> Result<()> {
        let open = match &vr {
            _ if tag == tags::PIXEL_DATA => Open::new(None, vrs, Holds::Fragments),
            b"SQ" => Open::new(None, vrs, Holds::Items),
            b"UN" => Open::new(None, Vrs::Implicit, Holds::Items),
            _ => bail!(
                "DICOM element ({:04X},{:04X}) has an undefined length, which its VR {} does not \
                 allow",
                tag.0,
                tag.1,
                String::from_utf8_lossy(&vr)
            ),
        };
        self.open.push(open);
        Ok(())
    }
}

/// Decodes a DICOM file (see the module's notes for what is read) to gray in [0, 1].
pub fn decode_gray_bytes(bytes: &[u8]) -> Result<GrayImage> {
    if !is_dicom(bytes) {
        bail!("not a DICOM file (no DICM magic at byte 128)");
    }
    let (ts, start) = read_meta(bytes)?;
    let codec = match ts.as_str() {
        IMPLICIT_LE | EXPLICIT_LE | DEFLATED_LE => Codec::Native,
        RLE => Codec::Rle,
        JPEG_BASELINE | JPEG_LOSSLESS | JPEG_LOSSLESS_SV1 => Codec::Jpeg,
        other => bail!(
            "DICOM transfer syntax {other} ({}) is not read: mura reads implicit/explicit VR little \
             endian, deflated, RLE lossless and JPEG baseline/lossless",
            syntax_name(other)
        ),
    };
    let rest = &bytes[start..];
    if ts == DEFLATED_LE {
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(rest)
            .take(MAX_INFLATED_BYTES + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| anyhow::anyhow!("DICOM deflated data set does not inflate: {e}"))?;
        if inflated.len() as u64 > MAX_INFLATED_BYTES {
            bail!(
                "DICOM deflated data set inflates to more than {} MiB; refusing to read it",
                MAX_INFLATED_BYTES >> 20
            );
        }
        walk(&inflated, Vrs::Explicit)?;
    } else {
        let vrs = match ts == IMPLICIT_LE {
            true => Vrs::Implicit,
            false => Vrs::Explicit,
        };
        walk(rest, vrs)?;
    }
    let obj = OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&bytes[128..])
        .map_err(|e| anyhow::anyhow!("not a readable DICOM file: {e}"))?;
    decode_object(&obj, codec)
}

/// An integer attribute (US, SS, IS…), `None` when absent or empty.
fn int(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Option<i64>> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if !e.value().primitive().is_some_and(|p| p.is_empty()) => e
            .value()
            .to_int::<i64>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("DICOM {name} is not an integer")),
        _ => Ok(None),
    }
}

/// The first value of a decimal attribute (DS, FD…), `None` when absent or empty.
fn float(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Option<f64>> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if !e.value().primitive().is_some_and(|p| p.is_empty()) => {
            let v = e
                .value()
                .to_multi_float64()
                .ok()
                .and_then(|v| v.first().copied())
                .filter(|v| v.is_finite())
                .ok_or_else(|| anyhow::anyhow!("DICOM {name} is not a finite number"))?;
            Ok(Some(v))
        }
        _ => Ok(None),
    }
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.value().to_str().ok()?;
    Some(s.trim_matches(['\0', ' ']).to_ascii_uppercase())
}

fn required(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<i64> {
    int(obj, tag, name)?.with_context(|| format!("DICOM file has no {name} (not an image?)"))
}

/// The image attributes that say how to read the pixel data.
struct Layout {
    rows: usize,
    cols: usize,
    samples: usize,
    bytes_per_sample: usize,
    bits_stored: u32,
    signed: bool,
    planar: bool,
}

/// What the pixel data holds, read from the file's image attributes: its layout, photometric
/// interpretation and whether it is colour.
struct Header {
    layout: Layout,
    pi: String,
    color: bool,
}

/// The image attributes of `obj`, checked: one frame, a photometric interpretation and bit depth
/// mura reads, and a size within the caps.
fn header(obj: &DefaultDicomObject, codec: Codec) -> Result<Header> {
    let rows = required(obj, tags::ROWS, "Rows")?;
    let cols = required(obj, tags::COLUMNS, "Columns")?;
    if rows < 1 || cols < 1 || rows as usize > MAX_DICOM_SIDE || cols as usize > MAX_DICOM_SIDE {
        bail!("DICOM image is {cols}x{rows}: mura reads 1 to {MAX_DICOM_SIDE} pixels on a side");
    }
    let frames = int(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames")?.unwrap_or(1);
    if frames != 1 {
        bail!(
            "multi-frame DICOM ({frames} frames) is refused: mura reads one 2-D image per file; \
             split the frames into single-frame files"
        );
    }
    let pi = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
        .context("DICOM file has no PhotometricInterpretation")?;
    let samples = int(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
    let color = match (pi.as_str(), samples) {
        ("MONOCHROME1" | "MONOCHROME2", 1) => false,
        ("RGB", 3) => true,
        ("YBR_FULL" | "YBR_FULL_422", 3) if codec == Codec::Jpeg => true,
        _ => bail!(
            "DICOM photometric interpretation {pi} with {samples} samples per pixel is not read: \
             mura reads MONOCHROME1, MONOCHROME2 and RGB (and JPEG's YBR_FULL, YBR_FULL_422)"
        ),
    };
    let allocated = required(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let stored = int(obj, tags::BITS_STORED, "BitsStored")?.unwrap_or(allocated);
    let high = int(obj, tags::HIGH_BIT, "HighBit")?.unwrap_or(stored - 1);
    if !matches!(allocated, 8 | 16) || !(8..=allocated).contains(&stored) || high != stored - 1 {
        bail!(
            "DICOM {allocated} bits allocated, {stored} stored, high bit {high} is not read: mura \
             reads 8 or 16 bits allocated, 8 to 16 stored, high bit = bits stored - 1"
        );
    }
    let signed = match int(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0) {
        0 => false,
        1 if !color => true,
        r => bail!("DICOM pixel representation {r} is not read (0 unsigned or 1 signed gray)"),
    };
    let planar = color
        && codec == Codec::Native
        && int(obj, tags::PLANAR_CONFIGURATION, "PlanarConfiguration")?.unwrap_or(0) == 1;
    let layout = Layout {
        rows: rows as usize,
        cols: cols as usize,
        samples: samples as usize,
        bytes_per_sample: allocated as usize / 8,
        bits_stored: stored as u32,
        signed,
        planar,
    };
    let n = layout.rows * layout.cols * layout.samples;
    if n as u64 * DECODE_BYTES_PER_SAMPLE > MAX_DECODE_BYTES {
        bail!(
            "DICOM image {cols}x{rows} with {samples} samples is too large to decode (mura decodes \
             at most {} Mi samples, {} MiB at {DECODE_BYTES_PER_SAMPLE} bytes each)",
            (MAX_DECODE_BYTES / DECODE_BYTES_PER_SAMPLE) >> 20,
            MAX_DECODE_BYTES >> 20
        );
    }
    Ok(Header { layout, pi, color })
}

fn decode_object(obj: &DefaultDicomObject, codec: Codec) -> Result<GrayImage> {
    let Header { layout, pi, color } = header(obj, codec)?;
    let pixel_data = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .context("DICOM file has no pixel data (7FE0,0010)")?;
    // Stored values, as the bit pattern: pixel-interleaved samples.
    let raw: Vec<u32> = match (codec, pixel_data.value()) {
        (Codec::Native, Value::Primitive(p)) => native(p, &layout)?,
        (Codec::Rle, Value::PixelSequence(s)) => rle(&fragments(s.fragments()), &layout)?,
        (Codec::Jpeg, Value::PixelSequence(s)) => jpeg(&fragments(s.fragments()), &layout, &pi)?,
        _ => bail!("DICOM pixel data is not encoded as its transfer syntax says"),
    };
    let mask = if layout.bits_stored == 32 {
        u32::MAX
    } else {
        (1u32 << layout.bits_stored) - 1
    };
    let value = |r: u32| -> f64 {
        let v = r & mask;
        if layout.signed && v >> (layout.bits_stored - 1) & 1 == 1 {
            v as f64 - (1u64 << layout.bits_stored) as f64
        } else {
            v as f64
        }
    };
    let data: Vec<f32> = if color {
        let max = mask as f64;
        raw.chunks_exact(3)
            .map(|p| {
                let g = 0.299 * value(p[0]) + 0.587 * value(p[1]) + 0.114 * value(p[2]);
                (g / max).clamp(0.0, 1.0) as f32
            })
            .collect()
    } else {
        gray(obj, raw.into_iter().map(value).collect(), &pi)?
    };
    Ok(GrayImage {
        width: layout.cols,
        height: layout.rows,
        data,
    })
}

/// Modality rescale, then the window or min–max, then MONOCHROME1's inversion, to [0, 1].
fn gray(obj: &DefaultDicomObject, mut x: Vec<f64>, pi: &str) -> Result<Vec<f32>> {
    let slope = float(obj, tags::RESCALE_SLOPE, "RescaleSlope")?;
    let intercept = float(obj, tags::RESCALE_INTERCEPT, "RescaleIntercept")?;
    if let (Some(m), Some(b)) = (slope, intercept) {
        x.iter_mut().for_each(|v| *v = *v * m + b);
    }
    let center = float(obj, tags::WINDOW_CENTER, "WindowCenter")?;
    let width = float(obj, tags::WINDOW_WIDTH, "WindowWidth")?;
    // In place: an image of 16 Mi samples holds 128 MiB of f64 here.
    let linear = |v: f64, c: f64, w: f64| {
        if v <= c - w / 2.0 {
            0.0
        } else if v > c + w / 2.0 {
            1.0
        } else {
            (v - c) / w + 0.5
        }
    };
    if let (Some(c), Some(w)) = (center, width) {
        let function = text(obj, tags::VOILUT_FUNCTION).unwrap_or_else(|| "LINEAR".into());
        match function.as_str() {
            "LINEAR" | "" => {
                if w < 1.0 {
                    bail!("DICOM window width {w} is below 1, which LINEAR does not allow");
                }
                x.iter_mut().for_each(|v| *v = linear(*v, c - 0.5, w - 1.0));
            }
            "LINEAR_EXACT" => {
                if w <= 0.0 {
                    bail!("DICOM window width {w} is not positive");
                }
                x.iter_mut().for_each(|v| *v = linear(*v, c, w));
            }
            "SIGMOID" => {
                if w <= 0.0 {
                    bail!("DICOM window width {w} is not positive");
                }
                x.iter_mut()
                    .for_each(|v| *v = 1.0 / (1.0 + (-4.0 * (*v - c) / w).exp()));
            }
            f => bail!("DICOM VOI LUT function {f} is not read (LINEAR, LINEAR_EXACT, SIGMOID)"),
        }
    } else {
        let (lo, hi) = x
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if hi > lo {
            x.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
        } else {
            x.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    let invert = pi == "MONOCHROME1";
    Ok(x.into_iter()
        .map(|v| {
            let v = v.clamp(0.0, 1.0);
            (if invert { 1.0 - v } else { v }) as f32
        })
        .collect())
}

/// Native pixel data's samples (little endian), pixel-interleaved.
fn native(p: &PrimitiveValue, l: &Layout) -> Result<Vec<u32>> {
    let n = l.rows * l.cols * l.samples;
    let bytes: Vec<u8> = match p {
        PrimitiveValue::U8(v) => v.to_vec(),
        PrimitiveValue::U16(v) => v.iter().flat_map(|s| s.to_le_bytes()).collect(),
        PrimitiveValue::I16(v) => v.iter().flat_map(|s| s.to_le_bytes()).collect(),
        _ => bail!("DICOM pixel data has an unexpected value representation"),
    };
    let need = n * l.bytes_per_sample;
    if bytes.len() < need {
        bail!(
            "DICOM pixel data holds {} bytes; {}x{} pixels of {} samples at {} bytes need {need}",
            bytes.len(),
            l.cols,
            l.rows,
            l.samples,
            l.bytes_per_sample
        );
    }
    let sample = |i: usize| -> u32 {
        if l.bytes_per_sample == 1 {
            bytes[i] as u32
        } else {
            u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32
        }
    };
    if l.planar {
        let plane = l.rows * l.cols;
        Ok((0..n).map(|i| sample((i % 3) * plane + i / 3)).collect())
    } else {
        Ok((0..n).map(sample).collect())
    }
}

/// The one frame's fragments, joined.
fn fragments(f: &[Vec<u8>]) -> Vec<u8> {
    f.iter().flatten().copied().collect()
}

/// RLE Lossless (PS3.5 annex G): a 64-byte header of segment offsets, a PackBits segment per
/// sample byte (most significant first), each `rows * cols` bytes.
fn rle(frag: &[u8], l: &Layout) -> Result<Vec<u32>> {
    let bad = |why: String| anyhow::anyhow!("DICOM RLE pixel data is malformed: {why}");
    if frag.len() < 64 {
        return Err(bad(format!(
            "{} bytes, shorter than its 64-byte header",
            frag.len()
        )));
    }
    let segments = u32_le(frag, 0) as usize;
    let want = l.samples * l.bytes_per_sample;
    if segments != want {
        return Err(bad(format!("{segments} segments, the image needs {want}")));
    }
    let mut offsets: Vec<usize> = (0..segments)
        .map(|i| u32_le(frag, 4 + 4 * i) as usize)
        .collect();
    offsets.push(frag.len());
    let plane = l.rows * l.cols;
    // Every segment checked before anything is allocated: PackBits makes at most 128 bytes of
    // 2, so a segment shorter than that ratio allows cannot fill its plane.
    for s in 0..segments {
        let (a, b) = (offsets[s], offsets[s + 1]);
        if a < 64 || a > b || b > frag.len() {
            return Err(bad(format!(
                "segment {s} spans bytes {a}..{b} of {}",
                frag.len()
            )));
        }
        if b - a < 2 * plane.div_ceil(128) {
            return Err(bad(format!(
                "segment {s} holds {} bytes, too few to decode to the {plane} the image needs",
                b - a
            )));
        }
    }
    let mut out = vec![0u32; plane * l.samples];
    for s in 0..segments {
        let seg = &frag[offsets[s]..offsets[s + 1]];
        let mut bytes = Vec::with_capacity(plane);
        let mut i = 0;
        while bytes.len() < plane && i < seg.len() {
            let n = seg[i] as i8;
            i += 1;
            if n >= 0 {
                let run = n as usize + 1;
                let lit = seg
                    .get(i..i + run)
                    .ok_or_else(|| bad(format!("segment {s} ends inside a literal run")))?;
                bytes.extend_from_slice(lit);
                i += run;
            } else if n != -128 {
                let &v = seg
                    .get(i)
                    .ok_or_else(|| bad(format!("segment {s} ends inside a repeat run")))?;
                bytes.extend(std::iter::repeat_n(v, 1 + (-(n as i16)) as usize));
                i += 1;
            }
        }
        if bytes.len() < plane {
            return Err(bad(format!(
                "segment {s} decodes to {} bytes, the image needs {plane}",
                bytes.len()
            )));
        }
        let (sample, byte) = (s / l.bytes_per_sample, s % l.bytes_per_sample);
        let shift = 8 * (l.bytes_per_sample - 1 - byte);
        for (p, &v) in bytes[..plane].iter().enumerate() {
            out[p * l.samples + sample] |= (v as u32) << shift;
        }
    }
    Ok(out)
}

/// JPEG baseline or lossless, its header checked against the file's rows, columns and samples
/// before it is decoded. Three components are YCbCr converted to RGB unless the file says RGB and
/// the JPEG has neither an Adobe (APP14) nor a JFIF marker to say otherwise (as pydicom decodes).
fn jpeg(frag: &[u8], l: &Layout, pi: &str) -> Result<Vec<u32>> {
    let mut d = jpeg_decoder::Decoder::new(frag);
    let has = |m: &[u8]| frag.windows(m.len()).any(|w| w == m);
    if pi == "RGB" && !has(b"Adobe") && !has(b"JFIF") {
        d.set_color_transform(jpeg_decoder::ColorTransform::RGB);
    }
    d.set_max_decoding_buffer_size(MAX_DECODE_BYTES as usize);
    d.read_info()
        .map_err(|e| anyhow::anyhow!("DICOM JPEG pixel data is not readable: {e}"))?;
    let info = d
        .info()
        .context("DICOM JPEG pixel data has no frame header")?;
    let (fmt_samples, wide) = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => (1, false),
        jpeg_decoder::PixelFormat::L16 => (1, true),
        jpeg_decoder::PixelFormat::RGB24 => (3, false),
        jpeg_decoder::PixelFormat::CMYK32 => (4, false),
    };
    if info.width as usize != l.cols || info.height as usize != l.rows || fmt_samples != l.samples {
        bail!(
            "DICOM JPEG pixel data is {}x{} with {fmt_samples} samples, the file says {}x{} with {}",
            info.width,
            info.height,
            l.cols,
            l.rows,
            l.samples
        );
    }
    if wide && l.bytes_per_sample != 2 {
        bail!("DICOM JPEG pixel data has 16-bit samples, the file allocates 8 bits");
    }
    let px = d
        .decode()
        .map_err(|e| anyhow::anyhow!("DICOM JPEG pixel data does not decode: {e}"))?;
    let n = l.rows * l.cols * l.samples;
    let out: Vec<u32> = if wide {
        px.chunks_exact(2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]) as u32)
            .collect()
    } else {
        px.iter().map(|&b| b as u32).collect()
    };
    if out.len() < n {
        bail!(
            "DICOM JPEG pixel data decodes to {} samples, the image needs {n}",
            out.len()
        );
    }
    Ok(out[..n].to_vec())
}
