#!/usr/bin/env python3
"""PyTorch side of `mura bench --device cpu`: torchvision DenseNet (one logit), default NCHW layout,
timed the same way (median over steps after warm-up) with torch.set_num_threads(THREADS).

Prints one JSON line: {"forward_s": ..., "train_step_s": ..., "images_per_s": ...}
Usage: python scripts/pytorch_cpu_bench.py [--arch densenet169] [--batch 8] [--image-size 224]
       [--steps 5] [--warmup 1] [--threads 2]
"""
import argparse
import json
import statistics
import time

import torch
import torchvision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="densenet169")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.arch)(num_classes=1)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    y = torch.randint(0, 2, (a.batch,)).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    fwd, step = [], []
    for i in range(a.warmup + a.steps):
        model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            model(x)
        tf = time.perf_counter() - t

        model.train()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x).squeeze(1), y)
        loss.backward()
        opt.step()
        ts = time.perf_counter() - t
        if i >= a.warmup:
            fwd.append(tf)
            step.append(ts)

    f, s = statistics.median(fwd), statistics.median(step)
    print(json.dumps({"forward_s": f, "train_step_s": s, "images_per_s": a.batch / s}))


if __name__ == "__main__":
    main()
