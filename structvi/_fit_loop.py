"""The loop of :meth:`structvi.fit.Fitter.run`: steps, stopping rules, nothing lost on errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from structvi.schedules import Plateau, check_int

if TYPE_CHECKING:
    from structvi.fit import FitResult, Fitter

DIVERGENCE_MARGIN = 10.0  # nats (or 10 % of |best|) below the best window mean: "diverged"


def run_loop(fitter: Fitter, steps: int, callback: Any, progress: bool,
             early_stopping: Plateau | None) -> FitResult:
    """Run up to ``steps`` steps of ``fitter`` and say why it stopped (module doc of fit)."""
    from structvi.fit import FitStopped

    check_int("steps", steps, 1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got callback={callback!r}")
    if early_stopping is not None and not isinstance(early_stopping, Plateau):
        raise TypeError(f"early_stopping must be a Plateau or None, got {early_stopping!r}")
    window = early_stopping.window if early_stopping is not None else 50
    fitter._window = window
    bar = tqdm(total=steps, disable=not progress, desc=f"structvi {fitter.estimator}")
    reason, message = "steps", ""
    try:
        reason, message = _loop(fitter, steps, bar, callback, early_stopping, window)
    except FitStopped as stop:
        reason, message = stop.reason, str(stop)
    except KeyboardInterrupt:
        reason, message = "interrupted", "interrupted (Ctrl-C); q is the last accepted one"
    except Exception as err:
        try:
            err.fit_result = result(fitter, "error", f"{type(err).__name__}: {err}")
        except AttributeError:  # an exception type without a __dict__: the fitter still has it
            err.add_note("structvi: the fit so far is in the Fitter (Fitter.state_dict())")
        else:
            err.add_note("structvi: the fit so far is attached as err.fit_result (a FitResult "
                         "with stopped_reason='error'; resume with Fitter.load_state_dict("
                         "result.state))")
        raise
    finally:
        bar.close()
    return result(fitter, reason, message)


def _loop(fitter: Fitter, steps: int, bar: Any, callback: Any, early_stopping: Plateau | None,
          window: int) -> tuple[str, str]:
    for _ in range(steps):
        rec = fitter.step()
        if not rec.skipped:
            bar.set_postfix(elbo=f"{rec.elbo:.6g}", refresh=False)
        bar.update()
        if callback is not None and callback(fitter, rec) is True:
            return "callback", "the callback returned True"
        if rec.skipped:
            continue
        if fitter.record.diverged(window, DIVERGENCE_MARGIN):
            best = fitter.record.best_elbo
            if fitter.record.best_state is not None:
                fitter.state = fitter.record.best_state
            return "diverged", (f"the ELBO's {window}-step mean fell from {best:.6g} to "
                                f"{_recent(fitter, window):.6g}; q is the best one seen")
        if early_stopping is not None and early_stopping.should_stop(fitter.history["elbo"]):
            return "plateau", f"the ELBO improved by less than {early_stopping.min_delta} nats " \
                              f"over {window} steps"
    return "steps", ""


def _recent(fitter: Fitter, window: int) -> float:
    e = fitter.history["elbo"]
    return sum(e[-window:]) / window


def result(fitter: Fitter, reason: str, message: str) -> FitResult:
    """The :class:`~structvi.fit.FitResult` of ``fitter`` now."""
    from structvi.fit import FitResult

    return FitResult(fitter.q, fitter.record.copy_lists(), fitter.state_dict(), reason, message)
