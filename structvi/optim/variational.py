r"""``VariationalNGD``: variational learning with Kronecker-structured Gaussian posteriors.

The variational form of :class:`~structvi.optim.StructuredNGD` (MATH §2.6, §3.9). Each
supported layer (``Linear``, ``Conv2d``; bias as a last input column) with mean matrix
:math:`\mu \in \mathbb{R}^{d_o \times d_K}` gets the posterior

.. math:: q(W) = \mathcal{N}\big(\mu,\ \rho^2\, (K K^\top) \otimes (C C^\top)\big), \qquad
          \rho = \sqrt{\tau / N}, \qquad W = \mu + \rho\, C E K^\top,\ E_{ij} \sim \mathcal{N}(0, 1)

(column-major ``vec``), every other trained parameter a diagonal Gaussian, and the optimizer
minimizes the per-datum tempered negative ELBO
:math:`\mathbb{E}_q[\bar\ell] + \tfrac{\tau}{N}\mathrm{KL}(q \| \mathcal{N}(0, \delta^{-1} I))`.
The factor updates are StructuredNGD's with the damping set to :math:`\lambda = \tau\delta/N`
and statistics taken at weight samples, so that at their fixed point
:math:`(KK^\top \otimes CC^\top)^{-1} \approx \mathbb{E}_q[\bar A \otimes \bar G] + \lambda I`;
the mean step preconditions the sampled gradient plus the prior gradient :math:`\lambda\mu`.
See ``docs/variational.md`` for the derivation and the comparison with IVON.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from structvi.optim import kfac
from structvi.optim._sampling import HALF, Sampling
from structvi.optim.optimizer import StructuredNGD
from structvi.structures.base import Structure

__all__ = ["VariationalNGD"]



class _SampleAveraged:
    """Kronecker statistics of ``M`` training draws, averaged over the draws.

    The base accumulates backward passes as micro-batches of one batch (the gradient side is
    multiplied by the total number of loss terms); ``M`` draws of the same batch are instead
    ``M`` estimates of one expectation, so the gradient side is divided by ``M²``.
    """

    def __init__(self, stats: kfac.KroneckerStatistics, draws: int) -> None:
        self._stats, self._draws = stats, draws

    def finalize(self) -> tuple[Structure, Structure]:
        """``(H_K, H_C)`` averaged over the draws."""
        H_K, H_C = self._stats.finalize()
        return H_K, H_C.scale(1.0 / self._draws**2)


def _positive(name: str, value: Any, where: str, *, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if strict else value < 0):
        raise ValueError(f"{name}{where} must be a finite number {'>' if strict else '>='} 0, "
                         f"got {name}={value!r}")


class VariationalNGD(Sampling, StructuredNGD):
    r"""Variational learning with Kronecker-structured Gaussian posteriors (MATH §3.9).

    A drop-in replacement for IVON's training loop::

        opt = VariationalNGD(model, data_size=len(train_set))
        for x, y in loader:
            for _ in range(opt.mc_samples):
                opt.zero_grad()
                with opt.sampled_params(train=True):
                    loss_fn(model(x), y).backward()
            opt.step()
        probs = structvi.optim.predict(model, opt, x_test, samples=32)

    **Posterior.** Each supported layer: :math:`\mathcal N(\mu, \rho^2 KK^\top \otimes CC^\top)`
    with :math:`\rho = \sqrt{\tau/N}` (``τ = temperature``, ``N = data_size``), ``K, C`` of the
    group's ``structures``. Every other trained parameter :math:`\theta`: a diagonal Gaussian
    :math:`\mathcal N(\theta, \rho^2 / (h + \lambda))` with :math:`h = v + \beta^t` — ``v`` the
    (not bias-corrected) second moment of the diagonal rule, so ``h`` starts at 1 like
    ``K = C = I`` and moves to the diagonal empirical Fisher (Vadam, Khan et al. 2018).

    **Update** (per step, after one or more training draws):

    .. math::
        &\lambda = \tau\delta/N \quad(\delta = \text{prior\_precision}) \\
        &g = \tfrac1M \textstyle\sum_{s=1}^M \nabla_W \bar\ell(W_s) + \lambda\mu
          \quad\text{(sampled gradient plus prior gradient, before preconditioning)} \\
        &H_K, H_C \text{ from the } M \text{ draws (averaged)}; \text{ factor update of }
          \text{StructuredNGD with damping } \lambda + \gamma \\
        &m \leftarrow \alpha_2 m + CC^\top g\, KK^\top, \qquad \mu \leftarrow \mu - \beta_2 m

    and the diagonal rule of StructuredNGD (AdamW) with ``g`` for other parameters. At a fixed
    point ``ν_K = ν_C = 0`` and ``E_q[∇ℓ̄] + λμ = 0``: with ``γ = extra_damping = 0`` the
    Kronecker-structured stationary point of the ELBO with Kronecker (empirical Fisher)
    curvature; the default ``γ = 1e-2`` caps the posterior variance of directions the data do
    not constrain (see ``extra_damping``).

    **Training draws.** Inside ``with opt.sampled_params(train=True):`` the weights are a draw;
    run forward and backward there. On exit the means are restored bit for bit (the parameter
    tensors are swapped, never written) and the draw's gradient is kept; ``step()`` averages
    the ``M`` draws since the last step. Zero the gradients before each draw (IVON's loop) with
    ``opt.zero_grad()`` or by setting them to ``None``: with ``mc_samples=1`` a draw's gradients
    are kept without a copy, and zeroing them in place elsewhere (``model.zero_grad(
    set_to_none=False)``) before a second draw of the same step raises an error. With
    ``antithetic=True`` draws alternate ``E, −E`` within a step; with ``antithetic="steps"``
    consecutive training draws pair up whatever step they belong to (with one draw per step:
    the draws of steps ``t`` and ``t+1``), and the second of a pair reuses the first's noise
    product ``N = C E Kᵀ``: ``W = μ − ρN`` around the *current* mean, with no new random
    numbers and no factor products (half the draw cost). Each draw is still exactly
    ``N(μ, Σ)``; a factor update between the two starts a new pair. The unpaired noise is
    kept in the state (key ``"paired_noise"``, one ``[W, b]``-sized tensor per layer), so a
    ``state_dict`` round trip continues the pairs. ``step(closure)`` runs ``closure`` (which
    zeroes gradients, computes the loss and calls ``backward``) ``mc_samples`` times, each in a
    training draw, and returns the mean loss. A ``step()`` without training draws uses the
    gradient at the mean (with a warning).

    Args:
        model: the network (see :class:`StructuredNGD`).
        params: parameters or param groups (``None``: every trainable parameter). Groups may set
            their own ``data_size``, ``prior_precision`` and ``temperature``.
        data_size: ``N``, the number of training examples the averaged loss is over.
        prior_precision: ``δ`` of the prior ``N(0, δ⁻¹I)`` (``0``: flat prior).
        temperature: ``τ`` (1: Bayesian posterior; 0: no noise, plain optimization).
        mc_samples: training draws per ``step(closure)``; the loop above uses it as a count.
        antithetic: ``True``: alternate ``E`` and ``−E`` in consecutive training draws of a
            step; ``"steps"``: in consecutive training draws across steps, reusing the noise
            product (see **Training draws**); ``False`` (default): independent draws.
        preconditioner_dtype: ``"auto"`` (default) keeps ``K, C`` in float32 when a parameter is
            bf16/fp16 and in the weight dtype otherwise; or a pair as in StructuredNGD.
        momentum_dtype: ``"auto"`` (default): float32 momenta for bf16/fp16 parameters.
        extra_damping: ``γ ≥ 0`` added to the damping of the Kronecker factor update only
            (``λ + γ``; the prior gradient stays ``λμ``): the extrinsic damping of noisy K-FAC.
            It bounds the preconditioner by ``1/(λ+γ)`` and the posterior variance of a
            Kronecker layer by ``ρ²/(λ+γ)`` per direction (a narrower, non-Bayesian posterior
            in directions of low curvature) and steadies training when ``λ = τδ/N`` is tiny.
            Default ``1e-2``: with ``0`` (the variational update itself) the defaults spike and
            stall on the digits MLP and CNN at a constant learning rate
            (``benchmarks/vngd_defaults.py``).
        master_means: keep a float32 copy of the mean of every bf16/fp16 parameter in the
            state (key ``"mean"``): steps update it and the parameter holds it rounded, so
            updates below the parameter's precision are not lost and draws are made around the
            float32 mean. ``None`` (default): on when a trained parameter is bf16/fp16. A
            parameter changed from outside (in place, e.g. ``load_state_dict`` of the model, or
            by assigning ``p.data``) re-seeds its mean; writes in place through ``p.data``
            (invisible to autograd's version counter) are not detected.
        **kwargs: any other StructuredNGD argument (``lr``, ``structures``, ``T``, ``lr_cov``,
            ...) except ``damping``, which is ``τδ/N`` here.

    Raises:
        TypeError: ``damping`` given, or a ``model`` StructuredNGD rejects.
        ValueError: ``data_size`` ≤ 0, ``prior_precision`` or ``temperature`` < 0, ``mc_samples``
            < 1, ``loss_average=None`` (the per-datum form needs an averaged loss), or any
            StructuredNGD error.
    """

    def __init__(
        self, model: nn.Module, params: Iterable[Any] | None = None, *, data_size: float,
        prior_precision: float = 1.0, temperature: float = 1.0, mc_samples: int = 1,
        antithetic: bool | str = False, preconditioner_dtype: Any = "auto",
        momentum_dtype: Any = "auto", master_means: bool | None = None,
        extra_damping: float = 1e-2, **kwargs: Any,
    ) -> None:
        if "damping" in kwargs:
            raise TypeError("VariationalNGD: damping is set by the prior, λ = temperature · "
                            "prior_precision / data_size; pass prior_precision instead of "
                            f"damping={kwargs['damping']!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got mc_samples={mc_samples!r}")
        if not isinstance(antithetic, bool) and antithetic != "steps":
            raise ValueError(f"antithetic must be True, False or 'steps', got "
                             f"antithetic={antithetic!r}")
        self._prior_defaults = dict(data_size=data_size, prior_precision=prior_precision,
                                    temperature=temperature, extra_damping=extra_damping)
        self._check_prior(self._prior_defaults, "")
        self.mc_samples, self.antithetic = mc_samples, antithetic
        self._means: dict[Tensor, Tensor] = {}  # parameter → its mean while a draw is in place
        self._grad_sum: dict[Tensor, Tensor] = {}
        self._borrowed: dict[Tensor, Tensor] = {}  # p → the draw's p.grad kept uncopied
        self._synced: dict[Tensor, tuple] = {}  # p → (master, version, data) when p = master
        self._rounding: dict[Tensor, Tensor] = {}  # p → its master written by this step
        self._last_noise: dict[Tensor, Tensor] = {}  # antithetic: the previous draw's noise
        # antithetic="steps": weight → the factors its kept noise product was made with
        self._paired_factors: dict[Tensor, Any] = {}
        self._train_draws = 0
        half = any(p.dtype in HALF for p in model.parameters() if p.requires_grad)
        if master_means is not None and not isinstance(master_means, bool):
            raise ValueError(f"master_means must be None or a bool, got "
                             f"master_means={master_means!r}")
        self.master_means = half if master_means is None else master_means
        if preconditioner_dtype == "auto":
            preconditioner_dtype = (torch.float32, torch.float32) if half else (None, None)
        if momentum_dtype == "auto":
            momentum_dtype = torch.float32 if half else None
        for name in ("relative_damping", "normalize_preconditioner"):
            if kwargs.get(name):
                raise ValueError(f"VariationalNGD: {name}=True is not a variational update (the "
                                 f"damping is the prior and the step is the natural gradient); "
                                 f"leave {name} unset")
            kwargs[name] = False
        kwargs.setdefault("diagonal_lr_ratio", 1.0)
        kwargs.setdefault("loss_average", "batch")
        super().__init__(model, params, damping=self._damping(self._prior_defaults),
                         preconditioner_dtype=preconditioner_dtype,
                         momentum_dtype=momentum_dtype, **kwargs)

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_prior(group: dict[str, Any], where: str) -> None:
        _positive("data_size", group["data_size"], where, strict=True)
        _positive("prior_precision", group["prior_precision"], where, strict=False)
        _positive("temperature", group["temperature"], where, strict=False)
        _positive("extra_damping", group.get("extra_damping", 0.0), where, strict=False)

    @staticmethod
    def _damping(group: dict[str, Any]) -> float:
        """``λ = τδ/N``."""
        return group["temperature"] * group["prior_precision"] / group["data_size"]

    @staticmethod
    def rho(group: dict[str, Any]) -> float:
        """``ρ = √(τ/N)`` of a param group."""
        return math.sqrt(group["temperature"] / group["data_size"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``data_size``, ``prior_precision``, ``temperature`` default as given."""
        group = {**self._prior_defaults, **param_group}
        where = "" if not self.param_groups else f" (param group {len(self.param_groups)})"
        self._check_prior(group, where)
        if group.get("loss_average", self.defaults["loss_average"]) is None:
            raise ValueError(f"loss_average{where} must be 'batch' or 'batch+sequence' for "
                             "VariationalNGD (the posterior is in per-datum form), got None")
        group["damping"] = self._damping(group)
        super().add_param_group(group)

    # ------------------------------------------------------------------ draws
    @contextlib.contextmanager
    def sampled_params(self, train: bool = False, generator: torch.Generator | None = None
                       ) -> Iterator[None]:
        """Put a posterior draw in the parameters; restore the means exactly on exit.

        Args:
            train: keep the gradients computed inside as a training draw for :meth:`step`.
            generator: source of the draw (``None``: torch's global generator); a generator
                on another device than the parameters (a CPU generator for CUDA parameters)
                draws there and the noise is moved.

        Raises:
            RuntimeError: called inside another ``sampled_params`` block.
        """
        if self._means:
            raise RuntimeError("sampled_params: already inside a sampled_params block; "
                               "exit it before drawing again")
        within = self.antithetic is True
        flip = train and within and self._train_draws % 2 == 1
        try:
            self._draw(generator, flip=flip, keep=train and within,
                       pair=train and self.antithetic == "steps")
            yield
        finally:
            for p, mean in self._means.items():
                p.data = mean
            self._means.clear()
        if train:
            self._collect_gradients()

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One variational step; ``closure`` is run ``mc_samples`` times in training draws."""
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        draws = self._train_draws
        if draws == 0:
            if "no draws" not in self._warned:
                self._warned.add("no draws")
                warnings.warn("VariationalNGD.step(): no sampled_params(train=True) pass since "
                              "the last step; the gradient at the mean is used (run forward and "
                              "backward inside `with opt.sampled_params(train=True):`)",
                              stacklevel=2)
        else:
            self._use_sampled_gradients(draws)
        amp = self._amp_scale()  # read once (a host sync on GPUs): here and in the base step
        with torch.no_grad():
            self._add_prior_gradient(amp[0])
        self._train_draws = 0
        self._grad_sum.clear()
        self._borrowed.clear()
        self._last_noise.clear()
        self._amp_pending = amp
        try:
            with torch.no_grad():
                self._update()  # half-precision parameters: their float32 masters are written
        finally:
            self.__dict__.pop("_amp_pending", None)
            with torch.no_grad():
                self._round_masters()
        return loss

    # No gradient-norm record (no gradient hooks are installed): :meth:`step` itself changes
    # ``p.grad`` (the draws' average and the prior term), so the base class's rule that
    # rescales the statistics by the change of the gradient norm between backward and
    # ``step()`` (user clipping) does not apply in the variational mode; the outlier and
    # non-finite rules still do.
    _records_backward_norms = False

    def _grad_hook(self, param: Tensor) -> None:
        """Nothing (see ``_records_backward_norms``; a hook of an older pickle may call it)."""
        del param

    def _update_factors(self, layer: kfac.Layer, group: dict[str, Any], factors: Any,
                        stats: Any, scale: float) -> Any:
        """The base factor update with the damping ``λ + γ`` (``γ = extra_damping``)."""
        extra = group.get("extra_damping", 0.0)
        if extra:
            group = {**group, "damping": group["damping"] + extra}
        return super()._update_factors(layer, group, factors, stats, scale)

    def _use_sampled_gradients(self, draws: int) -> None:
        """``p.grad ← mean of the draws' gradients``; statistics averaged over the draws.

        One draw: ``p.grad`` is used as it is (e.g. clipped in place after the draw); several:
        ``p.grad`` is replaced by the mean of the draws' gradients (see
        :meth:`_collect_gradients`).
        """
        if draws > 1:
            for p, total in self._grad_sum.items():  # a kept (uncopied) tensor is not changed
                p.grad = total / draws if p in self._borrowed else total.div_(draws)
            for weight, stats in list(self._stats.items()):
                self._stats[weight] = _SampleAveraged(stats, draws)

    def _add_prior_gradient(self, scale: float) -> None:
        """``∇ ← ∇ + λ μ`` (times the GradScaler scale ``scale``, which the gradients carry)."""
        for group in self.param_groups:
            damping = self._damping(group)  # the prior may have been edited
            if group["damping"] != damping:
                group["damping"] = damping
            if damping == 0.0:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_([p.grad for p in params], params, alpha=damping * scale)

    def __getstate__(self) -> dict[str, Any]:
        """As the base class; the master-mean sync records refer to this optimizer's tensors
        and are not copied (a copy re-checks its masters once)."""
        state = super().__getstate__()
        state["_synced"] = {}
        state["_paired_factors"] = {}  # a copy trusts its kept noise, as after a load
        return state

    def _after_load(self) -> None:
        """As the base class; the loaded kept noise belongs to the loaded factors."""
        super()._after_load()
        self._paired_factors.clear()

    # ------------------------------------------------------------------ inspection
    def posterior_covariance(self, module: nn.Module) -> Tensor:
        """``ρ² (K Kᵀ) ⊗ (C Cᵀ)`` of a layer as a dense matrix (small layers, for checks).

        Rows and columns follow the column-major ``vec`` of the ``d_o × d_K`` matrix
        ``[W, b]``, i.e. ``[W, b].T.reshape(-1)``.
        """
        factors = self.preconditioner(module)
        group = self.param_groups[self._group_index[module.weight]]
        K, C = factors.K.to_dense(), factors.C.to_dense()
        dtype = torch.promote_types(K.dtype, C.dtype)
        return self.rho(group) ** 2 * torch.kron((K @ K.T).to(dtype), (C @ C.T).to(dtype))
