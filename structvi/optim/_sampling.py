"""Draw-side machinery of :class:`~structvi.optim.VariationalNGD` (a mixin).

* training and prediction draws ``W = μ + ρ C E Kᵀ`` (any factor structure, through
  ``Structure.matmul``) and ``θ + ρ ε / √(h + λ)`` for the diagonal rule, swapped into the
  parameters without writing the means;
* ``antithetic="steps"``: training draws in pairs across steps, the second of a pair
  ``μ' − ρ N`` reusing the first's noise product ``N = C E Kᵀ`` (kept in the state under
  :data:`PAIRED`) while the factors are unchanged;
* the gradients kept from each training draw (the first by reference when ``mc_samples == 1``);
* the float32 master means of bf16/fp16 parameters, re-checked against the parameter only when
  its storage or version counter changed.

The mixin uses the attributes ``VariationalNGD.__init__`` sets (``_means``, ``_grad_sum``,
``_borrowed``, ``_synced``, ``_rounding``, ``_last_noise``, ``_train_draws``, ``mc_samples``,
``master_means``) and the base optimizer's tables (``_layers``, ``_biases``, ``state``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from structvi.optim import kfac
from structvi.structures.base import Structure

__all__ = ["HALF", "PAIRED", "Sampling"]

HALF = (torch.bfloat16, torch.float16)
PAIRED = "paired_noise"  # state key: the unpaired training draw's noise (antithetic="steps")


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _e_kt(E: Tensor, K: Structure, C: Structure) -> Tensor:
    """``E Kᵀ`` (any structure of ``K``, in ``K``'s dtype), returned in ``C``'s dtype."""
    return _cast(K.matmul_rows(_cast(E, K.dtype)), C.dtype)


class Sampling:
    """Mixin of :class:`~structvi.optim.VariationalNGD`: draws, kept gradients, master means."""

    @torch.no_grad()
    def _draw(self, generator: torch.Generator | None, *, flip: bool, keep: bool,
              pair: bool = False) -> None:
        """Swap a draw into every trained parameter. ``flip``/``keep``: the within-step
        antithetic pairs (``−E`` of the kept ``E``; keep ``E``); ``pair``: a training draw of
        ``antithetic="steps"``: the partner of the kept noise when every parameter can pair,
        else a new draw whose noise is kept."""
        partner = pair and self._can_pair()
        for group, p, layer in self._drawn():
            rho = self.rho(group)
            if layer is not None and pair:
                self._draw_paired(layer, rho, generator, partner)
            elif layer is not None:
                self._draw_layer(layer, rho, generator, flip, keep)
            else:
                self._draw_diagonal(p, group, rho, generator, flip, keep, pair, partner)

    def _drawn(self) -> Iterator[tuple[dict[str, Any], Tensor, kfac.Layer | None]]:
        """``(group, p, layer)`` for every parameter drawn on its own: a layer's weight (its
        bias is drawn with it) or a diagonal-rule parameter (``layer`` is ``None``)."""
        layers, biases = self._layers, self._biases
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or p in self._means:
                    continue
                layer = layers.get(p)
                if layer is not None or p not in biases or biases[p].weight not in layers:
                    yield group, p, layer

    def _can_pair(self) -> bool:
        """Whether every drawn parameter holds kept noise that is still valid (for a layer:
        made with its current factors; none recorded after a load or a copy)."""
        for _, p, layer in self._drawn():
            if PAIRED not in self.state.get(p, {}):
                return False
            if layer is not None:
                factors = self._factors(layer)
                if self._paired_factors.get(p, factors) is not factors:
                    return False
        return True

    def _noise(self, key: Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device, generator: torch.Generator | None, flip: bool, keep: bool
               ) -> Tensor:
        if flip and key in self._last_noise:
            return -self._last_noise.pop(key)
        if generator is not None and generator.device.type != device.type:
            # e.g. a CPU generator for CUDA parameters: draw where the generator lives
            E = torch.randn(shape, dtype=dtype, device=generator.device,
                            generator=generator).to(device)
        else:
            E = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        if keep:
            self._last_noise[key] = E
        return E

    def _draw_layer(self, layer: kfac.Layer, rho: float, generator: torch.Generator | None,
                    flip: bool, keep: bool) -> None:
        """``W = μ + ρ C E Kᵀ`` (``E`` standard normal, shape ``d_o × d_K``).

        Computed as ``C (K Eᵀ)ᵀ``: two structure products on views (no transposed copy), the
        result contiguous in the ``[W, b]`` layout, so the weight's part is a view of it.
        """
        factors = self._factors(layer)
        K, C = factors.K, factors.C
        E = self._noise(layer.weight, (C.dim, K.dim), C.dtype, layer.weight.device, generator,
                        flip, keep)
        EKt = _e_kt(E, K, C)
        if getattr(C, "name", None) == "dense" and self._draw_fused(layer, C.to_dense(), EKt,
                                                                     rho):
            return
        self._swap_layer(layer, C.matmul(EKt), rho)

    def _draw_paired(self, layer: kfac.Layer, rho: float, generator: torch.Generator | None,
                     partner: bool) -> None:
        """``antithetic="steps"``: ``W = μ − ρ N`` with the kept noise product ``N`` of the
        previous training draw (``partner``), or a new ``N = C E Kᵀ``, kept, and
        ``W = μ + ρ N``."""
        state = self.state[layer.weight]
        kept = state.pop(PAIRED, None)
        self._paired_factors.pop(layer.weight, None)
        if partner:
            self._swap_layer(layer, kept, -rho)
            return
        factors = self._factors(layer)
        K, C = factors.K, factors.C
        E = self._noise(layer.weight, (C.dim, K.dim), C.dtype, layer.weight.device, generator,
                        False, False)
        noise = C.matmul(_e_kt(E, K, C))  # C E Kᵀ
        state[PAIRED] = noise
        self._paired_factors[layer.weight] = factors
        self._swap_layer(layer, noise, rho)

    def _swap_layer(self, layer: kfac.Layer, noise: Tensor, scale: float) -> None:
        """Swap ``[W, b] = μ + scale · noise`` into the layer (``noise``: ``d_o × d_K``)."""
        weight = layer.weight
        if layer.bias is None:
            self._swap(weight, noise.view(weight.shape), scale)
            return
        part = noise[:, :-1]
        self._swap(weight, part if part.shape == weight.shape else part.reshape(weight.shape),
                   scale)
        self._swap(layer.bias, noise[:, -1], scale)

    def _draw_fused(self, layer: kfac.Layer, C: Tensor, EKt: Tensor, rho: float) -> bool:
        """``W = μ + ρ C (E Kᵀ)`` for a dense ``C`` with the addition fused into the product
        (``addmm``, and ``addmv`` for the bias column); ``False`` (nothing done) when the mean
        and the noise dtypes differ without a master mean (the general path then rounds)."""
        weight, bias = layer.weight, layer.bias
        means = []
        for p in (weight, bias):
            if p is None:
                continue
            master = self._master(p)
            mean = master if master is not None else p.data
            if mean.dtype != C.dtype:
                return False
            means.append(mean)
        self._means[weight] = weight.data
        d_out = weight.shape[0]
        if bias is None:
            sample = torch.addmm(means[0].view(d_out, -1), C, EKt, alpha=rho)
        else:
            self._means[bias] = bias.data
            sample = torch.addmm(means[0].view(d_out, -1), C, EKt[:, :-1], alpha=rho)
            bias.data = _cast(torch.addmv(means[1], C, EKt[:, -1], alpha=rho), bias.dtype)
        weight.data = _cast(sample.view(weight.shape), weight.dtype)
        return True

    def _draw_diagonal(self, p: Tensor, group: dict[str, Any], rho: float,
                       generator: torch.Generator | None, flip: bool, keep: bool,
                       pair: bool = False, partner: bool = False) -> None:
        """``θ + ρ ε / √(h + λ)`` with ``h = v + β^t`` (1 before the first step); ``pair``
        (``antithetic="steps"``): ``ε`` is the negation of the kept one (``partner``), or a
        new one that is kept."""
        state = self.state.get(p, {})
        dtype = torch.promote_types(p.dtype, torch.float32)
        h = torch.ones((), dtype=dtype, device=p.device)
        if "exp_avg_sq" in state:
            t = int(state["step"])
            h = state["exp_avg_sq"].to(dtype) + group["beta2"] ** t
        std = (h + group["damping"]).rsqrt()
        kept = self.state[p].pop(PAIRED, None) if pair else None
        if partner:
            E = -kept
        else:
            E = self._noise(p, tuple(p.shape), dtype, p.device, generator, flip, keep)
            if pair:
                self.state[p][PAIRED] = E
        self._swap(p, E * std, rho)

    def _swap(self, p: Tensor, noise: Tensor, scale: float) -> None:
        """Keep ``p``'s mean tensor aside and give ``p`` a new tensor ``mean + scale·noise``
        (around the float32 master mean when there is one)."""
        mean = p.data
        self._means[p] = mean
        master = self._master(p)
        if master is not None:  # added in float32, written rounded (one operation)
            p.data = torch.add(_cast(master, noise.dtype), noise, alpha=scale,
                               out=torch.empty_like(mean))
        elif noise.dtype == mean.dtype:
            p.data = torch.add(mean, noise, alpha=scale)
        else:  # low-precision parameter: add in the noise's (wider) dtype, round once
            p.data = torch.add(mean.to(noise.dtype), noise, alpha=scale,
                               out=torch.empty_like(mean))

    def _collect_gradients(self) -> None:
        """Keep this draw's gradients for :meth:`step`.

        With ``mc_samples == 1`` (one draw per step, the usual case) the first draw's gradient
        tensors are kept by reference (no copy; they are used as they are); with more, or from
        the second draw on, copies are summed. Zeroing the gradients in place between draws
        would erase a kept tensor: :meth:`zero_grad` copies them first, and a kept tensor that
        is still ``p.grad`` at the next draw's end is reported (see :meth:`_check_borrowed`).
        """
        grad_sum, borrowed = self._grad_sum, self._borrowed
        first = self._train_draws == 0 and self.mc_samples == 1
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                total = grad_sum.get(p)
                if total is None:
                    grad_sum[p] = grad.detach() if first else grad.detach().clone()
                    if first:
                        borrowed[p] = grad
                elif p in borrowed:
                    self._check_borrowed(p, grad)
                    del borrowed[p]
                    grad_sum[p] = total + grad
                else:
                    total.add_(grad)
        self._train_draws += 1

    def _check_borrowed(self, p: Tensor, grad: Tensor) -> None:
        if self._borrowed[p] is grad:
            raise RuntimeError(
                "VariationalNGD: a parameter's gradient tensor of the previous training draw "
                "was zeroed or accumulated in place before this draw (e.g. "
                "model.zero_grad(set_to_none=False) or p.grad.zero_()), and with "
                "mc_samples=1 it is kept without a copy; the draws' gradients cannot be "
                "averaged. Zero the gradients between draws with optimizer.zero_grad() (either "
                "set_to_none) or set them to None, or set mc_samples to the number of draws "
                "per step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.Optimizer.zero_grad`; with ``set_to_none=False`` the gradients
        kept from the step's previous training draws are copied before they are zeroed."""
        if not set_to_none:
            for p, grad in list(self._borrowed.items()):
                if p.grad is grad:
                    self._grad_sum[p] = grad.detach().clone()
                    del self._borrowed[p]
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ master means
    def _master(self, p: Tensor) -> Tensor | None:
        """The float32 mean of a half-precision ``p`` (created, or re-synced when ``p`` was
        changed from outside, e.g. by ``load_state_dict`` of the model).

        Whether ``p`` still holds the master rounded is known without comparing the tensors
        (which costs a copy, and a host synchronization on a GPU) while ``p`` keeps the
        storage and version counter it had when the two were last made equal: any in-place
        change of ``p`` (``load_state_dict``, ``torch.nn.init``, another optimizer) bumps the
        version and ``p.data = ...`` changes the storage. Only writes through ``p.data`` in
        place (which autograd does not see either) go unnoticed.
        """
        if not self.master_means or p.dtype not in HALF:
            return None
        state = self.state[p]
        master = state.get("mean")
        token = self._synced.get(p)
        if (master is not None and token is not None and token[0] is master
                and token[1] == p._version and token[2].data_ptr() == p.data_ptr()):
            return master
        if master is None or not torch.equal(master.to(p.dtype), p.data):
            master = state["mean"] = p.detach().to(torch.float32, copy=True)
        self._mark_synced(p, master)
        return master

    def _mark_synced(self, p: Tensor, master: Tensor) -> None:
        """Record that ``p`` holds ``master`` rounded now (the storage is kept alive, so its
        address cannot be reused by another tensor)."""
        self._synced[p] = (master, p._version, p.data)

    def _target(self, p: Tensor) -> Tensor:
        """The base step writes a half-precision parameter's float32 master (recorded for
        :meth:`_round_masters`), any other parameter itself."""
        master = self._master(p)
        if master is None:
            return p
        self._rounding[p] = master
        return master

    def _round_masters(self) -> None:
        """After the base step: every written master rounded into its parameter, in place."""
        if not self._rounding:
            return
        params, masters = list(self._rounding), list(self._rounding.values())
        self._rounding = {}
        torch._foreach_copy_(params, masters)
        for p, master in zip(params, masters):
            self._mark_synced(p, master)
