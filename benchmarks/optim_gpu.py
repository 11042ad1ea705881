"""GPU step time and peak memory of StructuredNGD vs AdamW (bf16 autocast, synthetic data).

Synthetic CIFAR-shaped batches (3×32×32, 100 classes) train a VGG-style CNN (BatchNorm
parameters follow StructuredNGD's diagonal rule) and a small ViT (patch 4, width 192, depth 6,
attention written with ``nn.Linear`` so every projection is preconditioned). For each optimizer:
mean step time (CUDA events, after warm-up; ``T = 10`` so preconditioner updates are included),
peak allocated memory over the measured steps, optimizer-state bytes, host synchronizations in
one step (``torch.cuda.set_sync_debug_mode``). SINGD rows appear when
``singd`` is installed. CUDA only: on a machine without CUDA it exits with a message
(``--cpu-smoke`` runs two steps of each configuration at tiny sizes, to check the script).

Variational section (``--only variational`` runs it alone): VariationalNGD (dense and diagonal
factors) against IVON, per-step time (CUDA events, interleaved rounds, fastest round) of the
IVON training loop (``zero_grad``; a training draw; forward, backward; ``step``) on an MLP
(3072-1024-1024-100 on flattened images) and the VGG, with float32 and with bf16 *parameters*
(no autocast; VariationalNGD keeps float32 factors and master means), ratio to IVON at the same
model and precision (issue 14's goal: ≤ 1.5), and the number of host synchronizations in one
step (``torch.cuda.set_sync_debug_mode``).

Run: ``python -m benchmarks.optim_gpu [--steps 50] [--batch 128] [--only variational]`` →
``benchmarks/results/optim_gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from benchmarks.optim_digits import hierarchical_groups, state_bytes
from structvi.optim import StructuredNGD, VariationalNGD

# the published INGD/SINGD update (no normalization, absolute damping), as singd runs it
SHARED = dict(T=10, lr_cov=0.05, damping=1e-3, alpha1=0.5, momentum=0.9, lr=1e-3)
NGD = dict(SHARED, relative_damping=False, normalize_preconditioner=False, diagonal_lr_ratio=1.0)


def vgg(width: int = 64, classes: int = 100) -> nn.Module:
    """VGG-11-style: conv-BN-ReLU blocks with max-pooling, then a linear classifier."""
    cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M",
           8 * width, 8 * width, "M"]
    layers, channels = [], 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item),
                       nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, classes))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small ViT: 4×4 patches, learned positions, mean-pooled tokens."""

    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, classes: int = 100,
                 image: int = 32, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def optimizers() -> dict:
    table = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "SGD-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "NGD-dense": lambda m: StructuredNGD(m, structures="dense", **NGD),
        "NGD-hierarchical": lambda m: StructuredNGD(m, hierarchical_groups(m, 15), **NGD),
        "NGD-diagonal": lambda m: StructuredNGD(m, structures="diagonal", **NGD),
        "NGD-diagonal-fp32-factors": lambda m: StructuredNGD(
            m, structures="diagonal", preconditioner_dtype=(torch.float32, torch.float32), **NGD),
        "NGD-dense-defaults": lambda m: StructuredNGD(m, structures="dense"),
    }
    try:
        from singd.optim.optimizer import SINGD
    except ImportError:
        return table
    for s in ("dense", "diagonal"):
        table[f"SINGD-{s}"] = lambda m, s=s: SINGD(m, structures=(s, s), warn_unsupported=False,
                                                    **SHARED)
    return table


def measure(make_model, make_opt, batch: int, steps: int, device: str, size: int) -> dict:
    torch.manual_seed(0)
    model = make_model().to(device)
    opt = make_opt(model)
    X = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(min(10, steps)):
        step()
    cuda = device == "cuda"
    syncs = _count_syncs(step) if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(steps):
        loss = step()
    seconds = None
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / steps
    return dict(step_s=seconds, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                state_bytes=state_bytes(opt), finite=bool(torch.isfinite(loss)), syncs=syncs)


def mlp(width: int = 1024, classes: int = 100, image: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image * image, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


VARIATIONAL = dict(T=10, lr_cov=0.05, alpha1=0.5, momentum=0.9, lr=1e-3, prior_precision=1.0,
                   temperature=1.0)


def variational_optimizers(data_size: int) -> dict:
    table = {
        "VariationalNGD-dense": lambda m: VariationalNGD(m, data_size=data_size,
                                                         structures="dense", **VARIATIONAL),
        "VariationalNGD-diagonal": lambda m: VariationalNGD(m, data_size=data_size,
                                                            structures="diagonal", **VARIATIONAL),
    }
    try:
        import ivon
    except ImportError:
        return table
    table["IVON"] = lambda m: ivon.IVON(m.parameters(), lr=0.1, ess=data_size)
    return table


def _variational_step(model, opt, X, y) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with opt.sampled_params(train=True):
        loss = nn.functional.cross_entropy(model(X).float(), y)
        loss.backward()
    opt.step()
    return loss


def _count_syncs(step) -> int | None:
    """Host synchronizations in one call of ``step`` (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def variational(models: dict, batch: int, steps: int, rounds: int, device: str,
                size: int) -> dict:
    """Per-step time of VariationalNGD and IVON, interleaved rounds, fastest round kept."""
    configs = {}
    for model_name, make_model in models.items():
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for name, make_opt in variational_optimizers(50_000).items():
                torch.manual_seed(0)
                model = make_model().to(device=device, dtype=dtype)
                X = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
                y = torch.randint(0, 100, (batch,), device=device)
                configs[model_name, precision, name] = (model, make_opt(model), X, y)
    cuda = device == "cuda"
    best: dict = {}
    losses: dict = {}
    for key, args in configs.items():
        for _ in range(min(10, steps)):
            _variational_step(*args)
    syncs = {key: _count_syncs(lambda args=args: _variational_step(*args)) for key, args in
             configs.items()} if cuda else {}
    for _ in range(rounds):
        for key, args in configs.items():
            if cuda:
                torch.cuda.synchronize()
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
            for _ in range(steps):
                losses[key] = _variational_step(*args)
            if cuda:
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / steps
                best[key] = min(best.get(key, seconds), seconds)
    out: dict = {}
    for (model_name, precision, name), loss in losses.items():
        key = (model_name, precision, name)
        r = dict(step_s=best.get(key), syncs=syncs.get(key), finite=bool(torch.isfinite(loss)),
                 state_bytes=state_bytes(configs[key][1]))
        ivon_s = best.get((model_name, precision, "IVON"))
        r["step_over_ivon"] = None if r["step_s"] is None or ivon_s is None else (
            r["step_s"] / ivon_s)
        out.setdefault(model_name, {}).setdefault(precision, {})[name] = r
        print(model_name, precision, name, r, flush=True)
    return out


def _variational_table(results: dict) -> list[str]:
    lines = ["| model | params | optimizer | ms/step | step / IVON | host syncs / step | "
             "state MiB |", "|---|---|---|---|---|---|---|"]
    for model_name, by_precision in results.items():
        for precision, rows in by_precision.items():
            for name, r in rows.items():
                ratio = "–" if r["step_over_ivon"] is None else f"{r['step_over_ivon']:.2f}"
                lines.append(f"| {model_name} | {precision} | {name} | {r['step_s'] * 1e3:.2f} | "
                             f"{ratio} | {r['syncs']} | {r['state_bytes'] / 2**20:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (checks only)")
    parser.add_argument("--rounds", type=int, default=3, help="variational: timed rounds")
    parser.add_argument("--only", choices=("all", "optimizers", "variational"), default="all")
    parser.add_argument("--out", default="benchmarks/results/optim_gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("benchmarks.optim_gpu needs CUDA (no GPU found); nothing was run.")
        sys.exit(0)
    device = "cuda" if not args.cpu_smoke else "cpu"
    steps, batch, size = (2, 4, 32) if args.cpu_smoke else (args.steps, args.batch, 32)
    models = {"VGG-11 (BN)": (lambda: vgg(16)) if args.cpu_smoke else vgg,
              "ViT-tiny/4": (lambda: ViT(dim=48, depth=2)) if args.cpu_smoke else ViT}
    results: dict = {}
    for model_name, make_model in (models if args.only != "variational" else {}).items():
        results[model_name] = {}
        for name, make_opt in optimizers().items():
            r = measure(make_model, make_opt, batch, steps, device, size)
            results[model_name][name] = r
            print(model_name, name, r, flush=True)
        adamw = results[model_name]["AdamW"]
        for r in results[model_name].values():
            if device == "cuda":
                r["step_over_adamw"] = r["step_s"] / adamw["step_s"]
                r["peak_over_adamw"] = r["peak_bytes"] / adamw["peak_bytes"]
    var_results: dict = {}
    if args.only != "optimizers":
        var_models = {"MLP 3072-1024-1024-100": (lambda: mlp(32)) if args.cpu_smoke else mlp,
                      "VGG-11 (BN)": (lambda: vgg(8)) if args.cpu_smoke else vgg}
        var_results = variational(var_models, batch, steps, 1 if args.cpu_smoke else args.rounds,
                                  device, size)
    result = dict(config=dict(steps=steps, batch=batch, device=device, ngd=NGD,
                              variational=VARIATIONAL, only=args.only,
                              gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                              torch=torch.__version__), results=results,
                  variational=var_results)
    if device == "cuda":
        out = Path(args.out)
        if args.only != "all" and out.exists():  # keep the other section of an earlier run
            earlier = json.loads(out.read_text())
            results = result["results"] = results or earlier.get("results", {})
            var_results = result["variational"] = var_results or earlier.get("variational", {})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        lines = ["| model | optimizer | ms/step | step / AdamW | peak GiB | peak / AdamW | "
                 "state MiB | host syncs / step |", "|---|---|---|---|---|---|---|---|"]
        for model_name, rows in results.items():
            for name, r in rows.items():
                lines.append(f"| {model_name} | {name} | {r['step_s'] * 1e3:.1f} | "
                             f"{r['step_over_adamw']:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
                             f"{r['peak_over_adamw']:.2f} | {r['state_bytes'] / 2**20:.1f} | "
                             f"{r.get('syncs')} |")
        if var_results:
            lines += ["", "VariationalNGD vs IVON (bf16 = bf16 parameters, no autocast):", "",
                      *_variational_table(var_results)]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
