"""DICOM cases for mura's DICOM reader, written and decoded by pydicom (an independent
implementation): `python3 scripts/dicom_cases.py OUT_DIR`.

Writes OUT_DIR/<case>.dcm and OUT_DIR/<case>.f32 (pydicom's decode of it after mura's documented
transform, float32 little endian, row-major, values in [0, 1]) and OUT_DIR/cases.txt, one line per
case: `<case> <rows> <columns> <exact|jpeg-color>` (jpeg-color: lossy JPEG colour, whose YCbCr
conversion rounds differently from decoder to decoder). The cases are files pydicom writes (every photometric
interpretation, bit depth, signedness, rescale, VOI window and transfer syntax mura reads that
pydicom can write: implicit/explicit VR little endian, deflated, RLE lossless) and the 2-D gray
or RGB test files that ship in pydicom's wheel in a syntax mura reads (JPEG baseline, RLE,
deflated, ...). OUT_DIR/refused.txt lists shipped files mura must refuse: `<case> <what the
error line says>`.

The transform (src/data/dicom.rs): pydicom's `apply_modality_lut` (rescale when slope and
intercept are both present), then `apply_windowing` with the first window when the file has one,
mapped from pydicom's output range to [0, 1], else min-max; MONOCHROME1 inverted. RGB: PIL's L
weights over 2^BitsStored - 1.
"""

import os
import shutil
import sys

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def expected(ds):
    """pydicom's decode of ds after mura's transform."""
    arr = ds.pixel_array
    pi = ds.PhotometricInterpretation
    if ds.SamplesPerPixel == 3:
        arr = arr.astype(np.float64)
        g = 0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]
        return np.clip(g / (2 ** ds.BitsStored - 1), 0, 1)
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        y = apply_windowing(x, ds)
        # apply_windowing's output range, as pydicom computes it
        bits = ds.BitsStored
        if ds.PixelRepresentation == 0:
            lo, hi = 0, 2**bits - 1
        else:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            m, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = lo * m + b, hi * m + b
        y = (y - lo) / (hi - lo)
    else:
        lo, hi = x.min(), x.max()
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    y = np.clip(y, 0, 1)
    if pi == "MONOCHROME1":
        y = 1 - y
    return y


def dataset(rows, cols, pi, bits_alloc, bits_stored, signed, pixels, **extra):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Mura^Test"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if pi == "RGB" else 1
    ds.PhotometricInterpretation = pi
    if pi == "RGB":
        ds.PlanarConfiguration = extra.pop("planar", 0)
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in extra.items():
        setattr(ds, k, v)
    dtype = {(8, False): "u1", (16, False): "<u2", (16, True): "<i2"}[(bits_alloc, signed)]
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    return ds


def pixels(rng, shape, bits, signed):
    if signed:
        return rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=shape)
    return rng.integers(0, 2**bits, size=shape)


def written(rng):
    """(name, dataset, transfer syntax) of every case pydicom writes."""
    cases = []
    for bits_alloc, bits_stored, signed in [
        (8, 8, False), (16, 8, False), (16, 10, False), (16, 12, False),
        (16, 16, False), (16, 12, True), (16, 16, True), (16, 15, True),
    ]:
        for pi in ["MONOCHROME2", "MONOCHROME1"]:
            sign = "s" if signed else "u"
            base = f"{pi.lower()}_{bits_alloc}a{bits_stored}{sign}"
            px = pixels(rng, (9, 7), bits_stored, signed)
            cases.append((f"{base}_minmax", dataset(9, 7, pi, bits_alloc, bits_stored, signed, px)))
            mid = float(px.mean())
            cases.append((f"{base}_rescale", dataset(
                9, 7, pi, bits_alloc, bits_stored, signed, px,
                RescaleSlope="2.5", RescaleIntercept="-1024")))
            for fn in ["LINEAR", "LINEAR_EXACT", "SIGMOID", None]:
                extra = dict(WindowCenter=f"{mid:.1f}", WindowWidth=f"{max(2.0, px.std()):.1f}")
                if fn:
                    extra["VOILUTFunction"] = fn
                cases.append((f"{base}_window_{(fn or 'default').lower()}", dataset(
                    9, 7, pi, bits_alloc, bits_stored, signed, px, **extra)))
            cases.append((f"{base}_window_rescaled", dataset(
                9, 7, pi, bits_alloc, bits_stored, signed, px, RescaleSlope="0.5",
                RescaleIntercept="100", WindowCenter=f"{mid * 0.5 + 100:.2f}",
                WindowWidth=f"{max(2.0, px.std() * 0.5):.2f}")))
    cases.append(("monochrome2_8a8u_window_width1", dataset(
        6, 5, "MONOCHROME2", 8, 8, False, pixels(rng, (6, 5), 8, False),
        WindowCenter="128", WindowWidth="1")))
    cases.append(("monochrome2_16a12u_constant", dataset(
        4, 4, "MONOCHROME2", 16, 12, False, np.full((4, 4), 700))))
    for bits in [8, 16]:
        alloc = 8 if bits == 8 else 16
        px = pixels(rng, (5, 7, 3), bits, False)
        cases.append((f"rgb_{alloc}a{bits}u", dataset(5, 7, "RGB", alloc, bits, False, px)))
        planar = np.moveaxis(px, -1, 0)
        cases.append((f"rgb_{alloc}a{bits}u_planar", dataset(
            5, 7, "RGB", alloc, bits, False, planar, planar=1)))
    out = []
    for name, ds in cases:
        out.append((name + "_explicit", ds, ExplicitVRLittleEndian))
    # Every transfer syntax, over a few of the cases (odd sizes included).
    pick = [c for c in cases if any(k in c[0] for k in (
        "monochrome2_8a8u_minmax", "monochrome1_16a12u_window_linear",
        "monochrome2_16a16s_rescale", "monochrome2_16a12s_window_sigmoid", "rgb_8a8u",
        "rgb_16a16u", "monochrome2_16a16u_minmax"))]
    for name, ds in pick:
        for ts, tag in [(ImplicitVRLittleEndian, "implicit"),
                        (DeflatedExplicitVRLittleEndian, "deflated"), (RLELossless, "rle")]:
            out.append((f"{name}_{tag}", ds, ts))
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(25)
    lines = []

    def emit(name, path):
        ds = pydicom.dcmread(path)
        y = expected(ds)
        y.astype("<f4").tofile(os.path.join(out_dir, name + ".f32"))
        lossy = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        color = "jpeg-color" if lossy and ds.SamplesPerPixel == 3 else "exact"
        lines.append(f"{name} {ds.Rows} {ds.Columns} {color}")

    for name, ds, ts in written(rng):
        ds = ds.copy()
        ds.file_meta = ds.file_meta.copy()
        path = os.path.join(out_dir, name + ".dcm")
        if ts == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        else:
            ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
        emit(name, path)

    # pydicom's shipped test files that mura reads: 2-D gray or RGB, one frame.
    for f in ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm",
              "MR_small_RLE.dcm", "image_dfl.dcm", "SC_rgb.dcm",
              "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_small_odd.dcm",
              "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_small_odd_jpeg.dcm",
              "SC_jpeg_no_color_transform.dcm", "SC_jpeg_no_color_transform_2.dcm",
              "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmd.dcm",
              "SC_rgb_jpeg_app14_dcmd.dcm", "MR_small_jpeg_ls_lossless.dcm"]:
        src = get_testdata_file(f, download=False)
        if src is None:
            continue
        ds = pydicom.dcmread(src)
        ts = ds.file_meta.TransferSyntaxUID
        if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                      "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
                      "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"):
            continue
        name = "pydicom_" + f[:-4].replace("+", "p")
        shutil.copy(src, os.path.join(out_dir, name + ".dcm"))
        emit(name, src)

    refused = []
    for f, why in [("JPGExtended.dcm", "1.2.840.10008.1.2.4.51 (JPEG Extended"),
                   ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91 (JPEG 2000)"),
                   ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80 (JPEG-LS Lossless)"),
                   ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2 (Explicit VR Big Endian"),
                   ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM (2 frames) is refused"),
                   ("rtdose_1frame.dcm", "32 bits allocated"),
                   ("liver_1frame.dcm", "1 bits allocated"),
                   ("examples_palette.dcm", "PALETTE COLOR"),
                   ("MR_truncated.dcm", "DICOM")]:
        src = get_testdata_file(f, download=False)
        if src is None:
            continue
        name = "refused_" + f[:-4]
        shutil.copy(src, os.path.join(out_dir, name + ".dcm"))
        refused.append(f"{name} {why}")

    with open(os.path.join(out_dir, "cases.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "refused.txt"), "w") as fh:
        fh.write("\n".join(refused) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
