#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpora (stdlib only; run from fuzz/):
.pth files in both of torch.save's formats, built with the same pickles torch writes (fake
`torch` modules stand in for the real ones), small PNGs of every colour type, MURA CSVs and
trees, and score CSVs. With a mura checkpoint's path as argument (README), also that model as .pth files."""
import collections, io, os, pickle, struct, sys, types, zipfile, zlib

# --- .pth -------------------------------------------------------------------------------
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
torch._utils = utils


def storage_class(name):
    cls = type(name, (), {})
    cls.__module__ = "torch"
    setattr(torch, name, cls)
    return cls


FloatStorage, LongStorage, HalfStorage = (storage_class(n) for n in ("FloatStorage", "LongStorage", "HalfStorage"))


def _rebuild_tensor_v2(*args):
    pass


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2


class Storage:
    def __init__(self, cls, key, fmt, values):
        self.cls, self.key, self.fmt, self.values = cls, key, fmt, values

    def data(self):
        return struct.pack("<%d%s" % (len(self.values), self.fmt), *self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", len(obj.values))
        return None


def state_dict():
    w = Storage(FloatStorage, "0", "f", [0.5 * i for i in range(6)])
    n = Storage(LongStorage, "1", "q", [7])
    h = Storage(HalfStorage, "2", "e", [1.0, -2.0, 0.25])
    sd = collections.OrderedDict()
    sd["features.conv0.weight"] = Tensor(w, 0, (2, 3), (3, 1))
    sd["features.conv0.transposed"] = Tensor(w, 0, (3, 2), (1, 3))
    sd["features.norm0.num_batches_tracked"] = Tensor(n, 0, (), ())
    sd["features.norm0.bias"] = Tensor(h, 1, (2,), (1,))
    return sd, [w, n, h]


def pickled(obj):
    f = io.BytesIO()
    Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def model_state_dict(path):
    """The tensors of a safetensors file as a state dict of contiguous tensors."""
    import json
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    sd, storages = collections.OrderedDict(), []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        fmt, cls = {"F32": ("f", FloatStorage), "I64": ("q", LongStorage)}[t["dtype"]]
        values = list(struct.unpack("<%d%s" % ((b - a) // struct.calcsize(fmt), fmt), data[a:b]))
        s = Storage(cls, str(len(storages)), fmt, values)
        stride, acc = [], 1
        for d in reversed(t["shape"]):
            stride.insert(0, acc)
            acc *= d
        sd[name] = Tensor(s, 0, tuple(t["shape"]), tuple(stride))
        storages.append(s)
    return sd, storages


def legacy_pth(sd_storages=None):
    sd, storages = sd_storages or state_dict()
    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    f.write(pickled(sd))
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
        f.write(struct.pack("<q", len(s.values)) + s.data())
    return f.getvalue()


def zip_pth(sd_storages=None):
    sd, storages = sd_storages or state_dict()
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled(sd))
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr("archive/data/" + s.key, s.data())
        z.writestr("archive/version", "3\n")
    return f.getvalue()


# --- PNG --------------------------------------------------------------------------------
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w, h, depth, colour, rows, plte=b"", interlace=0):
    raw = b"".join(b"\0" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    extra = chunk(b"PLTE", plte) if plte else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


PNGS = {
    "gray8": png(3, 2, 8, 0, [b"\x00\x80\xff", b"\x10\x20\x30"]),
    "gray16": png(2, 2, 16, 0, [b"\x00\x00\xff\xff", b"\x12\x34\x56\x78"]),
    "gray1": png(9, 1, 1, 0, [b"\xaa\x80"]),
    "graya8": png(2, 1, 8, 4, [b"\x40\xff\x80\x00"]),
    "rgb8": png(2, 2, 8, 2, [b"\xff\x00\x00\x00\xff\x00", b"\x00\x00\xff\x80\x80\x80"]),
    "rgba16": png(1, 1, 16, 6, [b"\x01\x02\x03\x04\x05\x06\xff\xff"]),
    "palette": png(2, 2, 8, 3, [b"\x00\x01", b"\x01\x00"], plte=b"\x00\x00\x00\xff\xff\xff"),
    "interlaced": png(1, 1, 8, 0, [b"\x80"], interlace=1),
}

# --- MURA CSVs and trees ----------------------------------------------------------------
P = "MURA-v1.1"
TREE = "\0".join([
    f"{P}/train/XR_WRIST/patient00001/study1_positive/image1.png\n{P}/train/XR_WRIST/patient00001/study1_positive/image2.png\n{P}/train/XR_HAND/patient00002/study1_negative/image1.png\n",
    f"{P}/train/XR_WRIST/patient00001/study1_positive/,1\n{P}/train/XR_HAND/patient00002/study1_negative/,0\n",
    f'"{P}/valid/XR_ELBOW/patient00003/study1_negative/image1.png"\n',
    f"{P}/valid/XR_ELBOW/patient00003/study1_negative/,1\n{P}/valid/XR_FOO/p/s/,0\n",
    "train/XR_WRIST/patient00001/study1_positive/image1.png\ntrain/XR_WRIST/patient00001/study1_positive/image2.png\n"
    "train/XR_HAND/patient00002/study1_negative/image1.png\nvalid/XR_ELBOW/patient00003/study1_negative/image1.png\n",
])
FOLDERS_ONLY = "\0\0\0\0" + (
    "train/XR_WRIST/patient00001/study1_positive/image1.png\ntrain/XR_WRIST/patient00001/study2/image10.png\n"
    "train/XR_WRIST/patient00001/study2/image2.png\ntrain/XR_UNKNOWN/p/s/image1.png\ntest/XR_HAND/patient9/study1/\n"
)

# --- score CSVs -------------------------------------------------------------------------
LABELS = f"{P}/valid/XR_WRIST/patient1/study1_positive/,1\n{P}/valid/XR_HAND/patient2/study1_negative/,0\n{P}/valid/XR_WRIST/patient3/study1_negative/,0\n"
PREDS = f"{P}/valid/XR_WRIST/patient1/study1_positive,1\n{P}/valid/XR_HAND/patient2/study1_negative/,1\n\n{P}/valid/XR_WRIST/patient3/study1_negative/,0\n"


def write(target, name, data):
    os.makedirs(os.path.join("corpus", target), exist_ok=True)
    with open(os.path.join("corpus", target, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


if __name__ == "__main__":
    write("pth", "legacy.pth", legacy_pth())
    write("pth", "zip.pth", zip_pth())
    if len(sys.argv) > 1:
        write("pth", "model_legacy.pth", legacy_pth(model_state_dict(sys.argv[1])))
        write("pth", "model_zip.pth", zip_pth(model_state_dict(sys.argv[1])))
    for name, data in PNGS.items():
        write("png", name + ".png", data)
    write("mura_tree", "csvs", TREE)
    write("mura_tree", "folders", FOLDERS_ONLY)
    write("score_csv", "scored", LABELS + "\0" + PREDS)
    write("score_csv", "bad_label", LABELS + "\0" + PREDS.replace(",0\n", ",7\n"))
