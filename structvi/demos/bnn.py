"""Demo 2: a Bayesian neural network in Pyro, Kronecker-structured VI against AutoNormal + Adam.

A ``PyroModule`` MLP ``64 → 32 (tanh) → 10`` on the bundled digits (80 % train / 20 % test),
priors ``N(0, 1/fan_in)`` on the weights and ``N(0, 1)`` on the biases, minibatches through
``pyro.plate(subsample_size=...)``. structvi: :class:`~structvi.pyro.AutoStructuredNormal` with a
Kronecker factor per weight matrix, trained by :class:`~structvi.pyro.NaturalGradientSVI`;
Pyro: ``AutoNormal`` (mean field) with ``Adam``. Both are scored on the test split by the
posterior predictive: accuracy, negative log-likelihood, expected calibration error (ECE); the
figure is the reliability diagram of both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from structvi.data import load_digits, split
from structvi.demos._common import Clock, markdown_table, progress, pyplot, save

BINS = 10


def make_model(hidden: int = 32):
    """The Bayesian MLP (a fresh ``PyroModule``)."""
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    def layer(d_in: int, d_out: int) -> PyroModule:
        lin = PyroModule[nn.Linear](d_in, d_out)
        lin.weight = PyroSample(dist.Normal(0.0, 1 / math.sqrt(d_in)).expand([d_out, d_in])
                                .to_event(2))
        lin.bias = PyroSample(dist.Normal(0.0, 1.0).expand([d_out]).to_event(1))
        return lin

    class BayesianMLP(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = layer(64, hidden), layer(hidden, 10)

        def forward(self, x: Tensor, y: Tensor | None = None, batch: int | None = None) -> Tensor:
            _ = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
                logits = self.fc2(torch.tanh(self.fc1(x[idx])))
                pyro.sample("y", dist.Categorical(logits=logits),
                            obs=None if y is None else y[idx])
            return logits

    return BayesianMLP()


def calibration(probs: Tensor, y: Tensor) -> dict[str, Any]:
    """Accuracy, NLL, ECE and the reliability-diagram bins (confidence, accuracy, count)."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).double()
    which = torch.bucketize(confidence, torch.linspace(0, 1, BINS + 1)[1:-1])
    bins, ece = [], 0.0
    for b in range(BINS):
        inside = which == b
        if inside.any():
            conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
            bins.append((conf, acc, int(inside.sum())))
            ece += float(inside.double().mean()) * abs(acc - conf)
    nll = -probs.gather(-1, y[:, None]).clamp_min(1e-12).log().mean()
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": ece, "bins": bins}


def train(kind: str, model, X: Tensor, y: Tensor, steps: int, show: bool) -> tuple[Any, float]:
    """Train one guide; returns it and the training seconds."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_sample

    from structvi.engine import NGDConfig
    from structvi.fit import StepRule
    from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if kind == "structvi":
        guide = AutoStructuredNormal(model, structure={"fc1.weight": "kronecker",
                                                       "fc2.weight": "kronecker"},
                                     init_loc_fn=init_to_sample, init_scale=0.05)
        warm = max(1, steps // 10)
        svi = NaturalGradientSVI(model, guide, estimator="stein", num_samples=8,
                                 config=lambda t: NGDConfig(lr=0.2 if t < warm else 0.05),
                                 generator=torch.Generator().manual_seed(0),
                                 step_rule=StepRule(accept="deferred"))  # one model run a step
        desc = "structvi Kronecker NGD"
    else:
        guide = AutoNormal(model, init_loc_fn=init_to_sample, init_scale=0.05)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        desc = "Pyro AutoNormal + Adam"
    clock = Clock()
    for _ in progress(range(steps), desc, enabled=show):
        with clock:
            svi.step(X, y, 256)
    return guide, clock.seconds


def predictive(model, guide, X: Tensor, draws: int = 100) -> Tensor:
    """Posterior-predictive class probabilities (mean over ``draws`` weight draws)."""
    from pyro.infer import Predictive

    with torch.no_grad():
        logits = Predictive(model, guide=guide, num_samples=draws,
                            return_sites=["_RETURN"])(X)["_RETURN"]
    return logits.softmax(-1).mean(0)


def plot(results: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, both methods."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect calibration")
    for label, r in results.items():
        conf, acc, count = zip(*r["bins"])
        ax.plot(conf, acc, "o-", label=f"{label} (ECE {r['ece']:.3f})")
    ax.set_xlabel("confidence (mean of bin)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("Digits BNN: reliability on the test split")
    ax.legend(fontsize=7)
    return save(fig, out_dir, "bnn_calibration.png")


def run(out_dir: Path, quick: bool = False, show: bool = True) -> dict[str, Any]:
    """Train both posteriors, print the table, save ``bnn_calibration.png``."""
    import pyro

    X, y = load_digits()
    X_tr, y_tr, X_te, y_te = split(X, y, 0.2, seed=0)
    mean, std = X_tr.mean(0), X_tr.std(0) + 0.1
    X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    steps = 20 if quick else 300
    results = {}
    for kind, label in (("structvi", "structvi Kronecker NGD"), ("pyro", "Pyro AutoNormal + Adam")):
        torch.manual_seed(0)
        model = make_model()
        guide, seconds = train(kind, model, X_tr, y_tr, steps, show)
        results[label] = {**calibration(predictive(model, guide, X_te), y_te), "seconds": seconds}
    pyro.clear_param_store()
    table = markdown_table(["method", "test accuracy", "NLL", "ECE", "seconds"],
                           [(k, f"{r['accuracy']:.3f}", f"{r['nll']:.3f}", f"{r['ece']:.3f}",
                             f"{r['seconds']:.1f}") for k, r in results.items()])
    print(f"digits BNN 64-32-10, {steps} steps, batch 256\n{table}")
    return {"results": results, "table": table, "png": plot(results, out_dir)}
