//! Small DICOM files made by hand (explicit VR little endian elements), for the DICOM tests.

pub fn el(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(group.to_le_bytes());
    v.extend(elem.to_le_bytes());
    v.extend(vr);
    let long = matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT");
    if long {
        v.extend([0, 0]);
        v.extend((value.len() as u32).to_le_bytes());
    } else {
        v.extend((value.len() as u16).to_le_bytes());
    }
    v.extend(value);
    v
}

pub fn us(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn text(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(b' ');
    }
    v
}

/// A DICOM file of the transfer syntax `ts` with the elements of `tail` (explicit VR little
/// endian) among the image attributes of a `rows` x `cols` 8-bit MONOCHROME2 image.
pub fn file(ts: &str, rows: u16, cols: u16, tail: &[Vec<u8>]) -> Vec<u8> {
    let mut uid = ts.as_bytes().to_vec();
    if uid.len() % 2 == 1 {
        uid.push(0);
    }
    let meta = el(0x0002, 0x0010, b"UI", &uid);
    let mut f = vec![0u8; 128];
    f.extend(b"DICM");
    f.extend(el(
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    f.extend(meta);
    let mut elements = vec![
        el(0x0028, 0x0002, b"US", &us(1)),
        el(0x0028, 0x0004, b"CS", &text("MONOCHROME2")),
        el(0x0028, 0x0010, b"US", &us(rows)),
        el(0x0028, 0x0011, b"US", &us(cols)),
        el(0x0028, 0x0100, b"US", &us(8)),
        el(0x0028, 0x0101, b"US", &us(8)),
        el(0x0028, 0x0102, b"US", &us(7)),
        el(0x0028, 0x0103, b"US", &us(0)),
    ];
    elements.extend(tail.iter().cloned());
    // In tag order, as PS3.5 requires and the reader checks.
    let tag = |e: &Vec<u8>| {
        (
            u16::from_le_bytes([e[0], e[1]]),
            u16::from_le_bytes([e[2], e[3]]),
        )
    };
    elements.sort_by_key(tag);
    for e in elements {
        f.extend(e);
    }
    f
}

pub const EXPLICIT: &str = "1.2.840.10008.1.2.1";

/// Encapsulated pixel data: an empty offset table, then `frags`.
pub fn encapsulated(frags: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x7FE0u16.to_le_bytes());
    v.extend(0x0010u16.to_le_bytes());
    v.extend(b"OB\0\0");
    v.extend(u32::MAX.to_le_bytes());
    let item = |v: &mut Vec<u8>, b: &[u8]| {
        v.extend([0xFE, 0xFF, 0x00, 0xE0]);
        v.extend((b.len() as u32).to_le_bytes());
        v.extend(b);
    };
    item(&mut v, &[]);
    for f in frags {
        item(&mut v, f);
    }
    v.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    v
}
