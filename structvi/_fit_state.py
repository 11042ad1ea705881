"""Argument and state validation of :class:`structvi.fit.Fitter` (all checks, no changes)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from structvi._fit_curvature import MeanCurvature
from structvi._fit_deferred import DeferredCheck
from structvi._fit_history import History
from structvi.engine import NGDConfig, NGDState

if TYPE_CHECKING:
    from structvi.fit import Fitter

_REQUIRED = ("engine", "generator", "history", "iteration", "elapsed", "estimator",
             "num_samples", "temperature")


def check_state_dict(fitter: Fitter, sd: Any) -> dict[str, Any]:
    """Parse and validate ``sd`` against ``fitter``; returns the parsed parts.

    Raises:
        ValueError: naming the first missing, malformed or mismatching entry.
    """
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict from Fitter.state_dict(), got "
                         f"{type(sd).__name__}")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"state_dict is missing {missing} (expected Fitter.state_dict() output)")
    for key in ("estimator", "num_samples", "temperature"):
        if sd[key] != getattr(fitter, key):
            raise ValueError(f"state_dict has {key}={sd[key]!r} but this Fitter has "
                             f"{key}={getattr(fitter, key)!r}")
    try:
        state = NGDState.from_state_dict(sd["engine"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"state_dict['engine'] is not a valid engine state: {err}") from err
    _check_engine(fitter, state)
    gen = _check_generator(fitter, sd["generator"])
    record = _check_record(sd)
    iteration = _int(sd, "iteration")
    elapsed = sd["elapsed"]
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or elapsed < 0:
        raise ValueError(f"state_dict elapsed must be a number >= 0, got {elapsed!r}")
    scale = sd.get("step_scale", 1.0)
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ValueError(f"state_dict step_scale must be in (0, 1], got {scale!r}")
    logdet = sd.get("log_abs_det")
    if logdet is not None and not (isinstance(logdet, (int, float)) and math.isfinite(logdet)):
        raise ValueError(f"state_dict log_abs_det must be a finite number, got {logdet!r}")
    curvature = MeanCurvature.check_state(sd.get("mean_curvature"), state.loc.shape[0])
    deferred = DeferredCheck.check_state(sd.get("deferred"), state.loc.shape[0])
    ref = None if deferred is None else deferred["reference"]
    if ref is not None and (ref.state.loc.dtype != state.loc.dtype
                            or ref.state.factor.dtype != state.factor.dtype
                            or ref.state.factor.spec() != state.factor.spec()):
        raise ValueError("state_dict deferred reference has another structure or dtype than "
                         "state_dict['engine']")
    return {"deferred": deferred, "state": state, "generator": gen, "record": record, "iteration": iteration,
            "elapsed": float(elapsed), "step_scale": float(scale),
            "log_abs_det": None if logdet is None else float(logdet),
            "mean_curvature": curvature}


def _check_engine(fitter: Fitter, state: NGDState) -> None:
    mine = fitter.state
    if state.factor.spec() != mine.factor.spec():
        raise ValueError(f"state_dict factor spec {state.factor.spec()} differs from this "
                         f"Fitter's {mine.factor.spec()}")
    if state.factor_momentum.spec() != mine.factor_momentum.spec():
        raise ValueError(f"state_dict factor_momentum spec {state.factor_momentum.spec()} "
                         f"differs from this Fitter's {mine.factor_momentum.spec()}")
    pairs = [("loc", state.loc, mine.loc), ("loc_momentum", state.loc_momentum, mine.loc_momentum),
             ("factor", state.factor, mine.factor),
             ("factor_momentum", state.factor_momentum, mine.factor_momentum)]
    for name, new, old in pairs:
        if new.dtype != old.dtype:
            raise ValueError(
                f"state_dict engine {name} has dtype {new.dtype} but this Fitter keeps "
                f"{old.dtype}; build the Fitter from a q with the saved dtypes (no silent switch)"
            )
    if tuple(state.loc.shape) != tuple(mine.loc.shape):
        raise ValueError(f"state_dict engine loc has shape {tuple(state.loc.shape)}, expected "
                         f"{tuple(mine.loc.shape)}")


def _check_generator(fitter: Fitter, gen_state: Any) -> torch.Tensor:
    ok = isinstance(gen_state, torch.Tensor) and gen_state.dtype == torch.uint8
    if ok:
        probe = torch.Generator(device=fitter.generator.device)
        try:
            probe.set_state(gen_state)
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError("state_dict['generator'] is not a torch.Generator state "
                         "(Generator.get_state() output)")
    return gen_state


def _check_record(sd: dict[str, Any]) -> History:
    rec = sd.get("record")
    if rec is None:  # a state_dict from before the step rule: history lists and skip counters
        rec = {"lists": sd["history"], "num_failed": sd.get("num_skipped", 0),
               "consecutive_failures": sd.get("consecutive_skips", 0)}
    if not isinstance(rec, dict):
        raise ValueError(f"state_dict['record'] must be a dict, got {type(rec).__name__}")
    return History.from_state_dict(rec)


def _int(sd: dict[str, Any], key: str) -> int:
    v = sd[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"state_dict {key} must be an integer >= 0, got {v!r}")
    return v


def failure_text(reason: str, est: Any) -> str:
    if reason == "undone":
        return ("the last step lowered the ELBO estimate beyond the deferred rule's allowance "
                "(or made every sample non-finite) and was undone")
    if reason == "rejected":
        return ("every backtracked proposal lowered the ELBO estimate beyond the step rule's "
                "allowance")
    if est.stats is None:
        return (f"log_joint or its gradient was non-finite at every sample (first value: "
                f"{est.bad_value})")
    return "the proposed state was non-finite at every step scale"


def widest(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def check_fitter_args(log_joint: Any, q: Any, temperature: Any, step_rule: Any) -> None:
    """Type and value checks of :class:`~structvi.fit.Fitter`'s main arguments."""
    from structvi._fit_rules import StepRule
    from structvi.gaussian import StructuredGaussian

    if not callable(log_joint):
        raise TypeError(
            f"log_joint must be a callable (n, d) -> (n,), got log_joint={log_joint!r}"
        )
    if not isinstance(q, StructuredGaussian):
        raise TypeError(f"q must be a StructuredGaussian, got q={type(q).__name__}")
    if q.batch_shape != torch.Size():
        raise ValueError(f"q must be unbatched (loc of shape (d,)), got batch_shape="
                         f"{tuple(q.batch_shape)}")
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"temperature must be a finite number >= 0, got temperature={temperature!r}"
        )
    if step_rule is not None and not isinstance(step_rule, StepRule):
        raise TypeError(f"step_rule must be a StepRule or None, got step_rule={step_rule!r}")


def check_config(config: Any) -> Any:
    if config is None or isinstance(config, NGDConfig) or callable(config):
        return config
    raise TypeError(
        f"config must be an NGDConfig, a callable step -> NGDConfig, or None, got "
        f"config={config!r}"
    )


def make_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is None:
        gen = torch.Generator(device=device)
        gen.seed()  # non-deterministic; pass a seeded generator for reproducible runs
        return gen
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got generator={generator!r}")
    return generator


def fitter_state_dict(fitter: Fitter) -> dict[str, Any]:
    """:meth:`structvi.fit.Fitter.state_dict`."""
    return {
        "engine": fitter.state.state_dict(),
        "generator": fitter.generator.get_state(),
        "history": fitter.record.copy_lists(),
        "record": fitter.record.state_dict(),
        "iteration": fitter.iteration,
        "num_skipped": fitter.num_skipped,
        "consecutive_skips": fitter.consecutive_skips,
        "elapsed": fitter.elapsed,
        "step_scale": fitter.step_scale,
        "log_abs_det": fitter.log_abs_det,
        "estimator": fitter.estimator,
        "num_samples": fitter.num_samples,
        "temperature": fitter.temperature,
        "mean_curvature": fitter.curvature.state_dict(),
        "deferred": fitter.deferred.state_dict(),
    }


def apply_state_dict(fitter: Fitter, parsed: dict[str, Any]) -> None:
    """Install the output of :func:`check_state_dict` (after every check passed)."""
    fitter.generator.set_state(parsed["generator"])
    fitter.state = parsed["state"]
    fitter.record = parsed["record"]
    fitter.iteration = parsed["iteration"]
    fitter.elapsed = parsed["elapsed"]
    fitter.step_scale = parsed["step_scale"]
    fitter._logdet_factor = None if parsed["log_abs_det"] is None else fitter.state.factor
    fitter._logdet = 0.0 if parsed["log_abs_det"] is None else parsed["log_abs_det"]
    fitter._sync_logdet()
    fitter.curvature.load(parsed["mean_curvature"])
    fitter.deferred.load(parsed["deferred"])
    fitter._deferred_state = fitter.state
