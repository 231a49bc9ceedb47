#!/usr/bin/env python3
"""Writes the small `.pth` fixtures that tests/weights/pth.rs imports.

Run with the torch venv:  /work/venvs/torch/bin/python scripts/make_pth_fixtures.py
(CI does not need torch: the outputs are committed under tests/fixtures/.)

A tiny torchvision DenseNet (growth 4, blocks (2, 2), 8 init features, bn_size 2, 1000 classes)
is filled with seeded random values, its dense-layer keys are renamed to the 2017 spelling
(`norm1` -> `norm.1`, ...) and its `num_batches_tracked` entries deleted, as in torchvision's
`densenet169-b2777c0a.pth`. To exercise the reader, a few entries are stored unusually:
`features.conv0.weight` as an `nn.Parameter`; `features.norm0.weight` as a strided
(transposed) view; `features.norm0.bias` at a non-zero offset inside a larger storage;
`features.norm5.running_var` as float64, `features.norm5.running_mean` as float16,
`features.norm5.bias` as bfloat16. Outputs:

- tiny_legacy.pth: `torch.save(sd, f, _use_new_zipfile_serialization=False)` (legacy format)
- tiny_legacy_v1.pth: the same, but every tensor pickled as PyTorch <= 0.3 did,
  `torch._utils._rebuild_tensor(storage, offset, size, stride)` (as 2017 files may be)
- tiny_zip.pth:    `torch.save({"state_dict": {"module." + k: v}, "epoch": 3}, f)` (zip format,
  DataParallel prefix, nested state dict)
- tiny_expected.safetensors: every tensor of `sd` as float32 (what an importer must read),
  under the MODERN names (`norm1`), written by the small writer below.
"""
import json
import os
import pickle
import struct
import types
import warnings

import numpy as np
import torch
import torchvision

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def legacy_name(k):
    # The inverse of torchvision's remap: denselayerN.norm1.weight -> denselayerN.norm.1.weight
    parts = k.split(".")
    if len(parts) >= 3 and parts[-3].startswith("denselayer") and parts[-2][:-1] in ("norm", "relu", "conv") \
            and parts[-2][-1] in "12" and parts[-1] in ("weight", "bias", "running_mean", "running_var"):
        return ".".join(parts[:-2] + [parts[-2][:-1], parts[-2][-1], parts[-1]])
    return k


class V1Pickler(pickle.Pickler):
    """Pickles tensors the PyTorch <= 0.3 way (storages still go through torch's persistent ids)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage deprecation
                storage = obj.storage()
            return (torch._utils._rebuild_tensor,
                    (storage, obj.storage_offset(), tuple(obj.size()), obj.stride()))
        return NotImplemented


V1_PICKLE = types.SimpleNamespace(Pickler=V1Pickler, Unpickler=pickle.Unpickler, dump=pickle.dump,
                                  load=pickle.load, __name__="pickle")


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    torch.manual_seed(1234)
    m = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                    bn_size=2, num_classes=1000)
    sd = {}
    for k, v in m.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        r = torch.randn(v.shape)
        if k.endswith("running_var"):
            r = r.abs() + 0.5
        sd[k] = r
    # Unusual storage, same values (up to the dtype's rounding):
    w = sd["features.norm0.weight"]
    sd["features.norm0.weight"] = torch.stack([w, -w], 1)[:, 0]  # stride 2
    b = sd["features.norm0.bias"]
    big = torch.randn(b.numel() + 7)
    big[5:5 + b.numel()] = b
    sd["features.norm0.bias"] = big[5:5 + b.numel()]  # storage offset 5
    sd["features.norm5.running_var"] = sd["features.norm5.running_var"].double()
    sd["features.norm5.running_mean"] = sd["features.norm5.running_mean"].half()
    sd["features.norm5.bias"] = sd["features.norm5.bias"].bfloat16()
    c0 = sd["features.conv0.weight"]
    assert not sd["features.norm0.weight"].is_contiguous()
    assert sd["features.norm0.bias"].storage_offset() == 5

    legacy = {legacy_name(k): v for k, v in sd.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    legacy["features.conv0.weight"] = torch.nn.Parameter(c0)
    legacy_od = type(m.state_dict())(legacy)  # an OrderedDict, as torchvision saved it
    os.makedirs(OUT, exist_ok=True)
    torch.save(legacy_od, os.path.join(OUT, "tiny_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(legacy_od, os.path.join(OUT, "tiny_legacy_v1.pth"), pickle_module=V1_PICKLE,
               _use_new_zipfile_serialization=False)
    nested = {"state_dict": {"module." + k: v for k, v in legacy_od.items()}, "epoch": 3}
    torch.save(nested, os.path.join(OUT, "tiny_zip.pth"))
    write_safetensors(os.path.join(OUT, "tiny_expected.safetensors"), sd)

    # Sanity: torch itself reads both back to the expected values.
    for name in ("tiny_legacy.pth", "tiny_legacy_v1.pth", "tiny_zip.pth"):
        got = torch.load(os.path.join(OUT, name), weights_only=name != "tiny_legacy_v1.pth")
        got = got.get("state_dict", got)
        for k, v in sd.items():
            key = legacy_name(k)
            g = got.get(key, got.get("module." + key))
            assert torch.equal(g.float(), v.float()), (name, k)
    with open(os.path.join(OUT, "tiny_legacy_v1.pth"), "rb") as f:
        assert b"torch._utils\n_rebuild_tensor\n" in f.read()
    for name in ("tiny_legacy.pth", "tiny_legacy_v1.pth", "tiny_zip.pth", "tiny_expected.safetensors"):
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
