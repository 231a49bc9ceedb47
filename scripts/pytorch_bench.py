"""PyTorch baseline for mura's DenseNet training throughput and memory.

Measures torchvision's DenseNet (one output logit) training steps -- forward,
BCE-with-logits, backward, Adam -- on synthetic random images (standard normal) and
random 0/1 labels, in three modes:

  eager-fp32              fp32 weights and activations, NCHW
  amp-bf16-channels-last  torch.autocast bf16, channels_last model and input
  compile                 torch.compile of the amp-bf16-channels-last model

Each mode runs in a fresh child process, so its peak memory is its own and an out-of-memory
error cannot poison the next measurement. For each mode: median step time over --steps
timed steps after --warmup steps (step_ms; every timed step in step_times_ms), images/s =
batch / median, and peak memory
(torch.cuda.max_memory_allocated on GPU; the process's peak RSS on CPU, which includes
the Python and torch runtime). Prints one JSON line per mode, and with --markdown a table.

--find-max-batch doubles the batch from --batch until a training step runs out of memory
(or --max-batch-limit), then bisects; each trial is a child process running two steps.

Weights are randomly initialised (no download): speed and memory do not depend on them.
On CUDA, cudnn.benchmark is on and PyTorch's defaults are kept (cuDNN may use TF32 for
fp32 convolutions; the JSON records it). Adam is PyTorch's default implementation.

Examples:
  python scripts/pytorch_bench.py --batch 64 --size 224 --markdown
  python scripts/pytorch_bench.py --device cpu --threads 2 --batch 2 --size 64 --steps 2 --modes eager-fp32
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ["eager-fp32", "amp-bf16-channels-last", "compile"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    p.add_argument("--arch", default="densenet169", help="torchvision DenseNet (default densenet169)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    p.add_argument("--modes", default=",".join(MODES), help="comma separated: " + ", ".join(MODES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find-max-batch", action="store_true", help="also find the largest batch that fits")
    p.add_argument("--max-batch-limit", type=int, default=4096, help="stop doubling here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON config of one child run
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"unknown mode(s) {bad}: use {', '.join(MODES)}")
    a.modes = modes
    for name in ["batch", "size", "steps", "max_batch_limit"]:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0:
        p.error("--warmup must be at least 0")
    if a.size < 32:
        p.error("--size must be at least 32 (DenseNet downsamples by 32)")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be at least 1")
    return a


def is_oom(e):
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return "out of memory" in msg or "can't allocate memory" in msg or "ALLOC_FAILED" in msg


def worker(cfg):
    """One mode at one batch size, in this (fresh) process. Returns a result dict."""
    import torch
    import torchvision

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", 0)  # set_device and friends need an index
    mode, batch, size = cfg["mode"], cfg["batch"], cfg["size"]
    amp = mode != "eager-fp32"
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)

    torch.manual_seed(cfg["seed"])
    model = getattr(torchvision.models, cfg["arch"])(weights=None, num_classes=1).to(dev)
    model.train()
    fmt = torch.channels_last if amp else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net = torch.compile(model) if mode == "compile" else model

    g = torch.Generator(device=dev).manual_seed(cfg["seed"] + 1)
    x = torch.randn(batch, 3, size, size, device=dev, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=dev, generator=g).float()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x).squeeze(1)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    try:
        t0 = time.perf_counter()
        for _ in range(cfg["warmup"]):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
        warmup_s = time.perf_counter() - t0
        times = []
        if cuda:
            # CUDA events around each step; one synchronise at the end so that timing
            # does not stall the launch queue.
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(cfg["steps"])]
            for s, e in ev:
                s.record()
                loss = step()
                e.record()
            torch.cuda.synchronize(dev)
            times = [s.elapsed_time(e) / 1e3 for s, e in ev]
        else:
            for _ in range(cfg["steps"]):
                t = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t)
        last_loss = loss.item()
    except Exception as e:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
        if is_oom(e):
            return {"mode": mode, "batch": batch, "oom": True}
        raise

    med = statistics.median(times)
    out = {
        "mode": mode,
        "arch": cfg["arch"],
        "batch": batch,
        "size": size,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "oom": False,
        "steps": cfg["steps"],
        "warmup": cfg["warmup"],
        "warmup_s": round(warmup_s, 3),
        "step_ms": round(med * 1e3, 3),
        "step_times_ms": [round(t * 1e3, 4) for t in times],
        "images_per_s": round(batch / med, 2),
        "last_loss": last_loss,
        "loss_finite": math.isfinite(last_loss),
    }
    if cuda:
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        out["cudnn_benchmark"] = True
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        out["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        conv = getattr(torch.backends.cudnn, "conv", None)
        out["cudnn_conv_fp32_precision"] = getattr(conv, "fp32_precision", None)
    else:
        out["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_mem_kind"] = "process peak RSS"
    return out


def run_child(args, device, mode, batch, steps, warmup):
    """Runs one measurement in a child process; returns its result dict."""
    cfg = {
        "device": device,
        "arch": args.arch,
        "mode": mode,
        "batch": batch,
        "size": args.size,
        "steps": steps,
        "warmup": warmup,
        "threads": args.threads,
        "lr": args.lr,
        "seed": args.seed,
    }
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        # A child killed by the kernel's OOM killer (CPU) exits with SIGKILL.
        if proc.returncode == -9:
            return {"mode": mode, "batch": batch, "oom": True}
        return {"mode": mode, "batch": batch, "error": f"child exited with status {proc.returncode} (see stderr above)"}
    return json.loads(lines[-1])


def find_max_batch(args, device, mode):
    """Largest batch whose training step fits: doubling from --batch, then bisecting."""

    def fits(b):
        r = run_child(args, device, mode, b, steps=1, warmup=1)
        if "error" in r:
            raise RuntimeError(f"{mode} at batch {b}: {r['error']}")
        print(f"# {mode}: batch {b} {'runs out of memory' if r['oom'] else 'fits'}", file=sys.stderr, flush=True)
        return not r["oom"]

    lo, hi, b = 0, None, args.batch  # lo fits (0: none known); hi does not (None: none known)
    while hi is None:
        if fits(b):
            lo = b
            if b >= args.max_batch_limit:
                return lo, None
            b = min(2 * b, args.max_batch_limit)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def markdown(results):
    rows = [
        "| mode | device | batch | step ms (median) | images/s | peak memory (GiB) | largest batch that fits |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error") or r.get("oom"):
            why = r.get("error") or "out of memory"
            rows.append(f"| {r['mode']} | | {r['batch']} | {why} | | | {r.get('max_batch', '')} |")
            continue
        mb = r.get("max_batch", "not searched")
        if r.get("max_batch_limit_reached"):
            mb = f">= {mb} (limit)"
        rows.append(
            f"| {r['mode']} | {r['device_name']} | {r['batch']} | {r['step_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['peak_mem_bytes'] / 2**30:.2f} | {mb} |"
        )
    return "\n".join(rows)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    try:
        import torch
        import torchvision  # noqa: F401 - the workers need it; fail here, in one line
    except ImportError as e:
        sys.exit(f"error: {sys.executable} cannot import {e.name}: pytorch_bench.py needs torch and torchvision")

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for but torch sees no CUDA device; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        sys.exit(f"error: unknown device '{device}': use auto, cuda, cuda:N or cpu")

    results = []
    for mode in args.modes:
        r = run_child(args, device, mode, args.batch, args.steps, args.warmup)
        if args.find_max_batch and "error" not in r:
            lo, hi = find_max_batch(args, device, mode)
            r["max_batch"] = lo
            r["max_batch_first_oom"] = hi
            r["max_batch_limit_reached"] = hi is None
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.markdown:
        print()
        print(markdown(results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
