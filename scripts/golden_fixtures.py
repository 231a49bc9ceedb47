#!/usr/bin/env python3
"""Golden fixtures: torchvision's DenseNet, with weights and inputs from a closed-form seeded
formula, evaluated by PyTorch. The Rust side rebuilds the same weights with
`mura::weights::seeded::seeded_state_dict(spec, seed)` and the same input with
`mura::weights::seeded::seeded_input_nhwc(n, h, w, c, seed)`, runs its own model, and compares.

Run:  /work/venvs/torch/bin/python scripts/golden_fixtures.py     (CI does not need torch;
the outputs are committed under tests/fixtures/golden/).

THE FORMULA (integer hash + exact scalings, so Python and Rust get the same bits):
  u(seed, t, i): x = seed*0x9E3779B97F4A7C15 + t*0xD1B54A32D192ED03 + i   (wrapping uint64)
                 z = x ^ (x >> 30); z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
                 z ^= z >> 31   (SplitMix64's finaliser, wrapping uint64)
                 u = (z >> 11) * 2**-52 - 1   (float64, in [-1, 1))
  Weights. Tensor number t = position in the model's state_dict() order, which is
  `DenseNetSpec::state_dict_layout()` order, counting EVERY entry (num_batches_tracked too);
  element i = row-major index in PyTorch layout; computed in float64, rounded ONCE to float32:
    conv weight [o, c, kh, kw]: sqrt(6 / (c*kh*kw)) * u
    BN weight 1 + 0.1*u;  BN bias 0.1*u;  running_mean 0.1*u;  running_var 1 + 0.2*abs(u)
    num_batches_tracked 0 (int64)
    classifier.weight [1, C]: u * (1 / sqrt(C));  classifier.bias [1]: 0.1*u
  Input x[n, c, h, w] = float32(u(seed, 2**32, j)), j = ((n*C + c)*H + h)*W + w (NCHW index).
  The fixture's "input.shape_nchw" is torch's NCHW; mura's model takes NHWC, so the Rust side
  must feed seeded_input_nhwc(N, H, W, C, seed), i.e. the same values transposed.
  (Rust: mura::weights::seeded::{formula_u, seeded_state_dict, seeded_input_nhwc}.)

THE LOSS (one output logit z_n per image, labels y = [1, 0], per-sample weights w = [0.6, 0.4],
i.e. w1 = 0.6 for the abnormal image and w0 = 0.4 for the normal one):
  loss = (1/N) * sum_n w_n * ( max(z_n, 0) - z_n*y_n + log(1 + exp(-|z_n|)) )
  == torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w, reduction="mean")

FIXTURE FORMAT (tests/fixtures/golden/<name>.json), all numbers plain JSON floats:
  {
    "name", "spec": {arch, growth_rate, block_config, num_init_features, bn_size} (DenseNetSpec JSON),
    "seed": int (weights and input), "formula": text, "loss_formula": text,
    "input": {"shape_nchw": [N, 3, H, W], "sum": float, "sum_sq": float},   # to check the input
    "labels": [1, 0], "sample_weights": [0.6, 0.4],
    "reference_dtype": "float64",
    "modes": {
      "train": {                                  # model.train(): BN uses batch statistics
        "logits": [z_0, z_1], "loss": float,
        "grad_norms": {param_name: L2 norm of d loss / d param, ...},   # every parameter
        "running_stat_norms": {bn_name.running_mean|running_var: L2 norm AFTER the forward},
        "num_batches_tracked": 1                  # every BN's counter after the forward
      },
      "eval": { "logits", "loss", "grad_norms" }   # model.eval(): BN uses running stats
    }   # each mode also has "torch_f32_rel_diff": the same keys (logits, loss, grad_norms,
        # running_stat_norms) holding |torch_f32 - ref| / |ref| of PyTorch's own float32 run
  }
  Reference values are computed by PyTorch in float64 from the float32 weights and input above
  (so they are the exact answer for those f32 numbers). torch_f32_rel_diff is the larger gap of
  PyTorch's two float32 runs, NCHW and channels_last (mura's layout).
  Suggested check for an f32 path: rel_err <= max(1e-5, 4 * torch_f32_rel_diff[quantity]) for
  logits, loss and running-stat norms; for an f64 path: rel_err <= 1e-9 everywhere.
  Train-mode GRADIENT norms in float32 are not a per-tensor property: a pre-activation within
  ~1e-5 of zero (there are a few among densenet121's ~10^6) can land on the other side of a ReLU
  in float32, and with batch statistics over a few values the changed gradient reaches every
  earlier tensor. Which ReLU flips depends on summation order: PyTorch's NCHW run flips in
  denseblock2, its channels_last run in denseblocks 3 and 4, and tensors it leaves intact (gap
  ~1e-6) are off by ~1e-3 in the other. So for float32 gradient norms use the mode's largest
  gap: rel_err <= max(1e-5, 4 * max over all grad_norms of torch_f32_rel_diff). Running-stat norms use PyTorch semantics
  (momentum 0.1, unbiased batch variance). Each mode starts from freshly loaded weights.

Also writes tests/fixtures/golden/seeded_weights.json: per model, the state_dict names in
order with each tensor's float64 sum and first three values, so that seeded_state_dict can
be checked without torch (tests/weights/seeded.rs).
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "golden")
FORMULA = ("u(seed,t,i) = SplitMix64 finaliser of seed*0x9E3779B97F4A7C15 + t*0xD1B54A32D192ED03 + i, "
           "(z>>11)*2^-52 - 1; t = state_dict position, i = row-major index; f64 then f32: conv "
           "sqrt(6/fan_in)*u; BN weight 1+0.1*u; BN bias 0.1*u; running_mean 0.1*u; running_var "
           "1+0.2*|u|; num_batches_tracked 0; classifier.weight u*(1/sqrt(C)); classifier.bias 0.1*u. "
           "Input x[n,c,h,w] = u(seed, 2^32, NCHW index). See scripts/golden_fixtures.py.")
LOSS = ("loss = mean_n w_n*(max(z_n,0) - z_n*y_n + log(1+exp(-|z_n|))), y = [1, 0], w = [0.6, 0.4] "
        "(= F.binary_cross_entropy_with_logits(z, y, weight=w))")


M64 = (1 << 64) - 1
INPUT_STREAM = 1 << 32


def formula_u(seed, t, n):
    """u(seed, t, i) for i = 0..n-1, as float64 numpy (uint64 numpy arithmetic wraps)."""
    base = np.uint64((seed * 0x9E3779B97F4A7C15 + t * 0xD1B54A32D192ED03) & M64)
    with np.errstate(over="ignore"):
        z = base + np.arange(n, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 52)) - 1.0


def seeded_state_dict(model, seed):
    """The formula's float32 tensors, in the model's state_dict order."""
    sd = {}
    c_final = model.classifier.in_features
    for t, (name, v) in enumerate(model.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros((), dtype=torch.int64)
            continue
        u = formula_u(seed, t, v.numel())
        if v.dim() == 4:
            vals = math.sqrt(6.0 / (v.shape[1] * v.shape[2] * v.shape[3])) * u
        elif name == "classifier.weight":
            vals = u * (1.0 / math.sqrt(c_final))
        elif name.endswith("running_var"):
            vals = 1.0 + 0.2 * np.abs(u)
        elif name.endswith(".weight"):
            vals = 1.0 + 0.1 * u
        else:  # BN bias, running_mean, classifier.bias
            vals = 0.1 * u
        sd[name] = torch.from_numpy(vals.astype(np.float32)).reshape(v.shape)
    return sd


def seeded_input(n, c, h, w, seed):
    u = formula_u(seed, INPUT_STREAM, n * c * h * w)
    return torch.from_numpy(u.astype(np.float32)).reshape(n, c, h, w)


def run(model, sd, x, train, dtype, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.load_state_dict(sd)
    model.to(dtype)
    model.to(memory_format=fmt)
    model.train(train)
    model.zero_grad(set_to_none=True)
    y = torch.tensor([1.0, 0.0], dtype=dtype)
    w = torch.tensor([0.6, 0.4], dtype=dtype)
    z = model(x.to(dtype).contiguous(memory_format=fmt)).reshape(-1)
    loss = F.binary_cross_entropy_with_logits(z, y, weight=w)
    loss.backward()
    out = {
        "logits": z.detach().tolist(),
        "loss": loss.item(),
        "grad_norms": {k: p.grad.norm().item() for k, p in model.named_parameters()},
    }
    if train:
        out["running_stat_norms"] = {k: v.norm().item() for k, v in model.state_dict().items()
                                     if k.endswith("running_mean") or k.endswith("running_var")}
        counters = {v.item() for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
        assert counters == {1}, counters
        out["num_batches_tracked"] = 1
    return out


def max_gap(gap):
    return {k: max(v.values()) if isinstance(v, dict) else max(v) if isinstance(v, list) else v
            for k, v in gap.items()}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def fixture(name, model, spec, seed, hw):
    sd = seeded_state_dict(model, seed)
    x = seeded_input(2, 3, hw, hw, seed)
    modes = {}
    for mode, train in (("train", True), ("eval", False)):
        ref = run(model, sd, x, train, torch.float64)
        # PyTorch's own float32 spread: the larger gap of its NCHW and channels_last runs.
        runs = [run(model, sd, x, train, torch.float32, cl) for cl in (False, True)]
        gap = {"logits": [max(rel(f["logits"][i], v) for f in runs)
                          for i, v in enumerate(ref["logits"])],
               "loss": max(rel(f["loss"], ref["loss"]) for f in runs)}
        for key in ("grad_norms", "running_stat_norms"):
            if key in ref:
                gap[key] = {k: max(rel(f[key][k], v) for f in runs) for k, v in ref[key].items()}
        model.to(memory_format=torch.contiguous_format)
        ref["torch_f32_rel_diff"] = gap
        modes[mode] = ref
    xd = x.double()
    doc = {
        "name": name, "spec": spec, "seed": seed, "formula": FORMULA, "loss_formula": LOSS,
        "input": {"shape_nchw": list(x.shape), "layout_note": "torch NCHW; feed mura NHWC",
                  "sum": xd.sum().item(), "sum_sq": (xd * xd).sum().item()},
        "labels": [1, 0], "sample_weights": [0.6, 0.4], "reference_dtype": "float64",
        "modes": modes,
    }
    path = os.path.join(OUT, name + ".json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{path}: {os.path.getsize(path)} bytes; logits train {modes['train']['logits']} "
          f"eval {modes['eval']['logits']}; torch f32 gaps "
          f"{[max_gap(modes[m]['torch_f32_rel_diff']) for m in modes]}")
    weights = [{"name": k, "shape": list(v.shape), "sum": v.double().sum().item(),
                "first": v.reshape(-1)[:3].tolist()} for k, v in sd.items()]
    return {"spec": spec, "seed": seed, "tensors": weights}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tiny = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                       bn_size=2, num_classes=1)
    tiny_spec = {"arch": "custom", "growth_rate": 4, "block_config": [2, 2],
                 "num_init_features": 8, "bn_size": 2}
    d121 = torchvision.models.densenet121(weights=None, num_classes=1)
    d121_spec = {"arch": "densenet121", "growth_rate": 32, "block_config": [6, 12, 24, 16],
                 "num_init_features": 64, "bn_size": 4}
    seeded = {
        "tiny_densenet": fixture("tiny_densenet", tiny, tiny_spec, 3, 32),
        "densenet121": fixture("densenet121", d121, d121_spec, 5, 64),
    }
    path = os.path.join(OUT, "seeded_weights.json")
    with open(path, "w") as f:
        json.dump(seeded, f, indent=0)
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
