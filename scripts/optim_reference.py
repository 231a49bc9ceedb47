"""Reference sequences for mura's Adam and ReduceLROnPlateau, from real PyTorch.

Writes tests/fixtures/optim/reference.json, read by src/optim.rs tests (CI does not need torch).
Run: python scripts/optim_reference.py
"""
import json
import pathlib

import torch

torch.manual_seed(1234)
out = {"torch_version": torch.__version__, "adam": [], "plateau": []}

for lr, wd, betas in [(1e-3, 0.0, (0.9, 0.999)), (1e-2, 0.05, (0.9, 0.999)), (3e-4, 0.0, (0.8, 0.99))]:
    n, steps = 11, 7
    p = torch.nn.Parameter(torch.randn(n) * 2.0)
    params0 = p.detach().clone()
    opt = torch.optim.Adam([p], lr=lr, betas=betas, eps=1e-8, weight_decay=wd)
    grads, params = [], []
    for t in range(steps):
        g = torch.randn(n) * (10.0 ** torch.randint(-4, 2, (n,)).float())
        g[t % n] = 0.0  # a zero gradient now and then
        p.grad = g.clone()
        opt.step()
        grads.append(g.tolist())
        params.append(p.detach().tolist())
    out["adam"].append(
        {"lr": lr, "weight_decay": wd, "betas": list(betas), "params0": params0.tolist(), "grads": grads, "params": params}
    )

for kw in [dict(), dict(patience=2, cooldown=1), dict(patience=1, factor=0.5, min_lr=2e-3, threshold=0.01)]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", **kw)
    metrics = [1.0, 0.9, 0.9, 0.89995, 0.95, 0.91, 0.92, 0.8, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91,
               0.92, 0.93, 0.94, 0.95, 0.96, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79,
               0.8, 0.81, 0.82, 0.83, 0.84, 0.85]
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    out["plateau"].append({"kwargs": kw, "lr0": 0.1, "metrics": metrics, "lrs": lrs})

path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/optim/reference.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print("wrote", path)
