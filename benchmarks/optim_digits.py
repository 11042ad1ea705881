"""StructuredNGD against SGD, AdamW, SINGD and IVON on scikit-learn's digits, and step costs.

Table 1: an MLP (64-128-128-10) and a small CNN on the 8×8 digits (1200 train / 237 validation
/ 360 test, batch 64, cosine lr decay). Every method runs each lr of a small grid; the lr with
the best validation accuracy is reported with its test accuracy and NLL, seconds per epoch,
per-step time (methods interleaved, fastest of several rounds) over AdamW's, optimizer-state
bytes, and the same in bf16 autocast (lr chosen in fp32).
Table 2: per-step time and state bytes on a wide MLP (784-1024-1024-10, batch 128, random
data). StructuredNGD and SINGD share ``T = 10``, ``lr_cov = 0.05``, ``damping = 1e-2``,
``alpha1 = 0.5``, ``momentum = 0.9``; singd and ivon-opt are the ``bench`` extra.

Run: ``python -m benchmarks.optim_digits [--quick]``
→ ``benchmarks/results/optim_digits.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from structvi.optim.kfac import is_supported, layer_dims

# the published INGD/SINGD update (no normalization, absolute damping), as singd runs it
NGD = dict(T=10, lr_cov=0.05, damping=1e-2, alpha1=0.5, momentum=0.9, relative_damping=False,
           normalize_preconditioner=False, diagonal_lr_ratio=1.0)


def hierarchical_groups(model: nn.Module, k: int) -> list[dict]:
    """One param group per Linear/Conv2d layer with ``k1 = k2 = min(k, dim // 2)`` per factor
    (structvi needs ``k1 + k2 <= dim``; SINGD's hierarchical15_15 instead fills small factors
    by priority), and one group with every other parameter."""
    groups, seen = [], set()
    for module in model.modules():
        if is_supported(module) and module.weight.requires_grad:
            params = [p for p in (module.weight, module.bias) if p is not None]
            dims = layer_dims(module, module.bias is not None)
            structures = tuple({"name": "hierarchical", "k1": min(k, d // 2), "k2": min(k, d // 2)}
                               for d in dims)
            groups.append(dict(params=params, structures=structures))
            seen.update(params)
    rest = [p for p in model.parameters() if p not in seen]
    return groups + ([dict(params=rest)] if rest else [])


# ---------------------------------------------------------------------------------- methods
def _singd(structure: str) -> Callable:
    def make(model: nn.Module, lr: float, n_train: int) -> torch.optim.Optimizer:
        from singd.optim.optimizer import SINGD

        del n_train
        return SINGD(model, lr=lr, structures=(structure, structure), warn_unsupported=False,
                     **NGD)
    return make


def _ngd(structures: str | int) -> Callable:
    """StructuredNGD with one structure, or hierarchical with ``k1 = k2 = structures``."""
    def make(model: nn.Module, lr: float, n_train: int) -> torch.optim.Optimizer:
        del n_train
        if isinstance(structures, int):
            return StructuredNGD(model, hierarchical_groups(model, structures), lr=lr, **NGD)
        return StructuredNGD(model, lr=lr, structures=structures, **NGD)
    return make


def _ivon(model: nn.Module, lr: float, n_train: int) -> torch.optim.Optimizer:
    import ivon

    return ivon.IVON(model.parameters(), lr=lr, ess=n_train)


METHODS: dict[str, tuple[Callable, list[float]]] = {
    "SGD-momentum": (lambda m, lr, n: torch.optim.SGD(m.parameters(), lr, momentum=0.9),
                     [0.03, 0.1, 0.3]),
    "AdamW": (lambda m, lr, n: torch.optim.AdamW(m.parameters(), lr), [1e-3, 3e-3, 1e-2]),
    "NGD-dense": (_ngd("dense"), [3e-3, 1e-2, 3e-2]),
    "NGD-hierarchical": (_ngd(15), [3e-3, 1e-2, 3e-2]),
    "NGD-diagonal": (_ngd("diagonal"), [3e-3, 1e-2, 3e-2]),
    "SINGD-dense": (_singd("dense"), [3e-3, 1e-2, 3e-2]),
    "SINGD-diagonal": (_singd("diagonal"), [3e-3, 1e-2, 3e-2]),
    "IVON": (_ivon, [0.03, 0.1, 0.3]),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps (singd keeps its factors outside ``state``)."""
    def tensors(value):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)
        elif hasattr(value, "named_tensors"):  # singd StructuredMatrix
            for _, t in value.named_tensors():
                yield t

    found = list(tensors(dict(opt.state)))
    found += [t for g in opt.param_groups for k, v in g.items() if k != "params"
              for t in tensors(v)]  # IVON keeps its buffers in the groups
    for name in ("Ks", "Cs", "m_Ks", "m_Cs"):
        found += list(tensors(getattr(opt, name, {})))
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in found}.values())


# ---------------------------------------------------------------------------------- data, models
def digits_split(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": perm[:1200], "val": perm[1200:1437], "test": perm[1437:]}
    return {k: (X[i], y[i]) for k, i in parts.items()}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


MODELS = {"MLP 64-128-128-10": mlp, "CNN": cnn}


def train_step(model: nn.Module, opt, x: Tensor, y: Tensor, bf16: bool) -> None:
    opt.zero_grad()
    sampled = opt.sampled_params(train=True) if hasattr(opt, "sampled_params") else (
        contextlib.nullcontext())
    with sampled:  # IVON: forward and backward at a weight sample
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    opt.step()


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, bf16: bool) -> tuple[float, float]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(X).float()
    nll = nn.functional.cross_entropy(logits, y).item()
    return (logits.argmax(1) == y).float().mean().item(), nll if math.isfinite(nll) else 1e9


def run(make_model, make_opt, lr: float, data, epochs: int, bf16: bool) -> dict:
    """Train one configuration; curve = (training seconds, test accuracy) after each epoch."""
    torch.manual_seed(0)
    model = make_model()
    Xtr, ytr = data["train"]
    opt = make_opt(model, lr, len(ytr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(ytr) // 64))
    gen = torch.Generator().manual_seed(1)
    epoch_times, curve, clock = [], [], 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            train_step(model, opt, Xtr[idx], ytr[idx], bf16)
            sched.step()
        epoch_times.append(time.perf_counter() - start)
        clock += epoch_times[-1]
        curve.append((clock, evaluate(model, *data["test"], bf16)[0]))
    val_acc, val_nll = evaluate(model, *data["val"], bf16)
    test_acc, test_nll = evaluate(model, *data["test"], bf16)
    return dict(lr=lr, val_acc=val_acc, val_nll=val_nll, test_acc=test_acc, test_nll=test_nll,
                sec_per_epoch=sum(epoch_times) / epochs, state_bytes=state_bytes(opt),
                curve=curve)


def step_times(configs: dict, steps: int, rounds: int) -> dict[str, float]:
    """Mean seconds per training step of each ``name → (model, opt, X, y, bf16)``.

    10 warm-up steps, then ``rounds`` rounds of ``steps`` steps with the configurations
    interleaved; the fastest round is kept (robust to load on a shared machine). With
    ``steps`` a multiple of ``T = 10`` the preconditioner updates are included.
    """
    times: dict[str, list[float]] = {name: [] for name in configs}
    for model, opt, X, y, bf16 in configs.values():
        for _ in range(10):
            train_step(model, opt, X, y, bf16)
    for _ in range(rounds):
        for name, (model, opt, X, y, bf16) in configs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, X, y, bf16)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: min(t) for name, t in times.items()}


def digits_table(methods: list[str], epochs: int, grid_size: int, steps: int,
                 rounds: int) -> dict:
    data = digits_split()
    results: dict = {}
    for model_name, make_model in MODELS.items():
        results[model_name] = {}
        for name in methods:
            make_opt, grid = METHODS[name]
            grid = grid[1:1 + grid_size] if grid_size < len(grid) else grid
            runs = [run(make_model, make_opt, lr, data, epochs, False) for lr in grid]
            best = max(runs, key=lambda r: (r["val_acc"], -r["val_nll"]))
            bf16 = run(make_model, make_opt, best["lr"], data, epochs, True)
            results[model_name][name] = dict(fp32=best, bf16=bf16, grid=grid)
            print(f"{model_name:18s} {name:17s} lr={best['lr']:<6g} test acc {best['test_acc']:.4f}"
                  f"  bf16 {bf16['test_acc']:.4f}  {best['sec_per_epoch']:.2f} s/epoch", flush=True)
        _add_step_times(results[model_name], make_model, data, steps, rounds)
    return results


def _add_step_times(entries: dict, make_model, data, steps: int, rounds: int) -> None:
    """Per-step time of each method at its chosen lr, fp32 and bf16, over AdamW's fp32 time."""
    X, y = data["train"][0][:64], data["train"][1][:64]
    configs = {}
    for name, entry in entries.items():
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = make_model()
            opt = METHODS[name][0](model, entry["fp32"]["lr"], len(data["train"][1]))
            configs[name, precision] = (model, opt, X, y, precision == "bf16")
    times = step_times(configs, steps, rounds)
    for (name, precision), seconds in times.items():
        entries[name][precision]["step_s"] = seconds
        entries[name][precision]["step_over_adamw"] = seconds / times["AdamW", "fp32"]


# ---------------------------------------------------------------------------------- wide MLP
def wide_methods() -> dict[str, Callable]:
    names = ["SGD-momentum", "AdamW", "NGD-dense", "NGD-hierarchical", "NGD-diagonal",
             "SINGD-dense", "SINGD-diagonal", "IVON"]
    table = {name: METHODS[name][0] for name in names}
    table["SINGD-hierarchical15_15"] = _singd("hierarchical15_15")
    return table


def wide_table(steps: int, rounds: int) -> dict:
    """Per-step time (see :func:`step_times`) and state bytes on the wide MLP, random data."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    configs = {}
    for name, make_opt in wide_methods().items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10))
        configs[name] = (model, make_opt(model, 1e-3, 10_000), X, y, False)
    times = step_times(configs, steps, rounds)
    results = {name: dict(step_s=times[name], step_over_adamw=times[name] / times["AdamW"],
                          state_bytes=state_bytes(configs[name][1])) for name in configs}
    for name, e in results.items():
        print(f"wide MLP {name:24s} {e['step_s'] * 1e3:8.1f} ms/step "
              f"{e['state_bytes'] / 2**20:7.2f} MiB", flush=True)
    return results


# ---------------------------------------------------------------------------------- report
def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def markdown(digits: dict, wide: dict) -> str:
    lines = ["## Digits (best lr by validation accuracy; test split)", ""]
    head = ("| model | method | lr | test acc | test NLL | s/epoch | step / AdamW | state MiB "
            "| bf16 acc | bf16 NLL | bf16 s/epoch | bf16 step / AdamW |")
    for model_name, methods in digits.items():
        lines += [head, "|" + "---|" * 12]
        for name, e in methods.items():
            f, b = e["fp32"], e["bf16"]
            lines.append(
                f"| {model_name} | {name} | {f['lr']:g} | {f['test_acc']:.4f} "
                f"| {f['test_nll']:.3f} | {f['sec_per_epoch']:.3f} | {f['step_over_adamw']:.2f} "
                f"| {_mib(f['state_bytes'])}"
                f" | {b['test_acc']:.4f} | {b['test_nll']:.3f} | {b['sec_per_epoch']:.3f}"
                f" | {b['step_over_adamw']:.2f} |")
        lines.append("")
    lines += ["## Wide MLP 784-1024-1024-10, batch 128, random data (T = 10, mean step incl. "
              "preconditioner updates)", "", "| method | ms/step | step / AdamW | state MiB |",
              "|---|---|---|---|"]
    for name, e in wide.items():
        lines.append(f"| {name} | {e['step_s'] * 1e3:.1f} | {e['step_over_adamw']:.2f} "
                     f"| {_mib(e['state_bytes'])} |")
    return "\n".join(lines) + "\n"


def goals(digits: dict, wide: dict) -> dict:
    """The benchmark's stated goals, each with the numbers it was judged on."""
    out = {f"wide {n}: step <= 1.3x AdamW": (wide[n]["step_over_adamw"] <= 1.3,
                                               round(wide[n]["step_over_adamw"], 2))
           for n in ("NGD-diagonal", "NGD-hierarchical", "NGD-dense") if n in wide}
    for ours, theirs in (("NGD-dense", "SINGD-dense"), ("NGD-diagonal", "SINGD-diagonal"),
                         ("NGD-hierarchical", "SINGD-hierarchical15_15")):
        if ours in wide and theirs in wide:
            out[f"wide {ours} faster than {theirs}"] = (
                wide[ours]["step_s"] < wide[theirs]["step_s"],
                [round(wide[ours]["step_s"] * 1e3, 1), round(wide[theirs]["step_s"] * 1e3, 1)])
    if "NGD-diagonal" in wide:
        out["wide NGD-diagonal state < AdamW state"] = (
            wide["NGD-diagonal"]["state_bytes"] < wide["AdamW"]["state_bytes"],
            [wide["NGD-diagonal"]["state_bytes"], wide["AdamW"]["state_bytes"]])
    for model_name, methods in digits.items():
        for name, e in methods.items():
            if name.startswith("NGD"):
                gap = abs(e["bf16"]["test_acc"] - e["fp32"]["test_acc"]) * 100
                out[f"{model_name} {name}: bf16 within 1 point"] = (gap <= 1.0, round(gap, 2))
    return {k: {"met": bool(v[0]), "value": v[1]} for k, v in out.items()}


def plot(digits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(digits), figsize=(6 * len(digits), 4.2))
    for ax, (model_name, methods) in zip(axes, digits.items()):
        for name, e in methods.items():
            t, acc = zip(*e["fp32"]["curve"])
            ax.plot(t, acc, marker=".", label=f"{name} (lr {e['fp32']['lr']:g})")
        ax.set(title=model_name, xlabel="training wall time (s)", ylabel="test accuracy",
               ylim=(0.5, 1.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, lrs and steps")
    parser.add_argument("--out", default="benchmarks/results/optim_digits.json")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 gives stable timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="singd")
    epochs, grid, steps, rounds = (12, 2, 10, 3) if args.quick else (30, 3, 20, 5)
    config = dict(quick=args.quick, epochs=epochs, lr_grid_size=grid, wide_steps=steps,
                  wide_rounds=rounds,
                  ngd=NGD, torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine())
    digits = digits_table(args.methods, epochs, grid, steps, rounds)
    wide = wide_table(steps, rounds)
    result = dict(config=config, digits=digits, wide_mlp=wide, goals=goals(digits, wide))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = markdown(digits, wide)
    table += "\n## Goals\n\n" + "\n".join(
        f"- [{'x' if g['met'] else ' '}] {k}: {g['value']}" for k, g in result["goals"].items())
    out.with_suffix(".md").write_text(table + "\n")
    plot(digits, out.with_suffix(".png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
