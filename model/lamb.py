"""LAMB with a fused per-tensor step: ``timm.optim.Lamb``'s math (the settings we use), in two fused passes per tensor.

timm's ``Lamb`` on CPU runs its single-tensor path: per parameter ~13 eager ops from Python, each a full
pass over the tensor (several allocate a temporary). Here one function, :func:`lamb_update_`, does a
tensor's whole update and is compiled once with ``torch.compile(dynamic=True)``: inductor fuses the moment
updates, the bias-corrected update, the weight decay, both norms of the trust ratio and the parameter write
into a reduction pass and a write pass. Every number (learning rate, bias corrections, weight decay, whether
the trust ratio applies, betas, eps) enters as one small tensor and tensors are flattened to 1-D, so every
group and every step runs the same few compiled graphs (one per size class: no recompiles from the scheduler
or layer decay; ZeRO's flat partitions are just other sizes).

``fused``: ``"auto"`` compiles and falls back (with one warning) to the eager step when compiling fails,
e.g. no C++ compiler on a CPU machine or no Triton on a GPU one; ``True`` compiles and raises if it cannot;
``False`` runs eagerly. The eager step is timm's own functional ``lamb`` (its single-tensor loop on CPU,
its foreach path on CUDA), i.e. exactly ``timm.optim.Lamb``; compiled and eager agree up to float rounding
(~1e-5 relative after 100 steps, ``benchmarks/lamb_step.py``).

State and checkpoints match timm's ``Lamb``: ``state[p] = {"exp_avg", "exp_avg_sq"}``, a CPU float
``group["step"]`` per group, so either optimizer resumes the other's state.

Not supported (we do not use them; a clear error rather than silently different math): timm's internal
``max_grad_norm`` clipping (the trainer clips once, globally), ``caution``, ``decoupled_decay``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Fused = bool | Literal["auto"]
#: Index of each per-(group, step) hyper-parameter in the ``hyper`` tensor of :func:`lamb_update_`.
LR, WEIGHT_DECAY, ADAPT, BIAS_CORRECTION1, BIAS_CORRECTION2, BETA1, BETA2, ONE_MINUS_BETA1, ONE_MINUS_BETA2, EPS = \
    range(10)


def lamb_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hyper: Tensor, *,
                 grad_averaging: bool, trust_clip: bool) -> None:
    """One tensor's LAMB step, in place on ``param``, ``exp_avg``, ``exp_avg_sq`` (timm's single-tensor math).

    Args:
        param, grad, exp_avg, exp_avg_sq: same shape and device, any shape.
        hyper: ``(10,)`` float32 on the same device, indexed by the constants above: learning rate, weight
            decay, 1.0 if the trust ratio applies (weight decay != 0 or ``always_adapt``) else 0.0, bias
            corrections 1 and 2 (1.0 when off), beta1, beta2, 1 - beta1, 1 - beta2 (taken in float64, as
            timm does), eps. Every number is a tensor entry, none a
            Python float: with ``dynamic=True`` torch 2.14 reuses a graph compiled for
            ``addcmul_(value=1 - 0.98)`` when called with ``1 - 0.999`` (a stale dynamic float, cf.
            pytorch/pytorch#194976), so floats here would silently keep the first group's values.
        grad_averaging, trust_clip: as timm ``Lamb`` (group constants).
    """
    lr, weight_decay, adapt = hyper[LR], hyper[WEIGHT_DECAY], hyper[ADAPT]
    if grad_averaging:
        exp_avg.lerp_(grad, hyper[ONE_MINUS_BETA1])
    else:
        exp_avg.mul_(hyper[BETA1]).add_(grad)
    exp_avg_sq.mul_(hyper[BETA2]).add_(grad * grad * hyper[ONE_MINUS_BETA2])
    denom = exp_avg_sq.sqrt() / hyper[BIAS_CORRECTION2].sqrt() + hyper[EPS]
    update = (exp_avg / hyper[BIAS_CORRECTION1]) / denom + weight_decay * param
    w_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    if trust_clip:
        ratio = ratio.clamp(max=1.0)
    ratio = torch.where(adapt > 0, ratio, 1.0)
    param.add_(update * (ratio * -lr))


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_update() -> Callable[..., None]:
    """:func:`lamb_update_` through ``torch.compile`` (one wrapper per process; dynamo caches its graphs)."""
    if "update" not in _COMPILED:
        _COMPILED["update"] = torch.compile(lamb_update_, dynamic=True, fullgraph=True)
    return _COMPILED["update"]


class Lamb(torch.optim.Optimizer):
    """LAMB (NVLAMB, as ``timm.optim.Lamb`` with ``max_grad_norm=None``) with a compiled per-tensor step.

    Args:
        params: parameters or groups (each group may set ``lr``, ``weight_decay``, ...).
        lr, bias_correction, betas, eps, weight_decay, grad_averaging, trust_clip, always_adapt: timm's
            ``Lamb`` arguments of the same names and defaults. As there, the trust ratio is skipped on
            groups with ``weight_decay == 0`` unless ``always_adapt``.
        fused: ``"auto"`` (compile, else eager with a warning), ``True`` (compile or raise), ``False``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, trust_clip: bool = False, always_adapt: bool = False,
                 fused: Fused = "auto"):
        if fused not in (True, False, "auto"):
            raise ValueError(f"Lamb: fused must be true, false or 'auto', got {fused!r}")
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"Lamb: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, trust_clip=trust_clip,
                        always_adapt=always_adapt, max_grad_norm=None)
        super().__init__(params, defaults)
        self.fused = fused
        self._update: Callable[..., None] | None = None
        if fused is not False:
            try:
                self._update = _compiled_update()
            except Exception as exc:  # torch.compile unavailable (e.g. an unsupported Python)
                self._compile_failed(exc)

    def _compile_failed(self, exc: Exception) -> None:
        """``fused: true``: a clear error; ``auto``: one warning, then timm's eager step from here on."""
        if self.fused is True:
            raise RuntimeError(f"Lamb: optim.fused is true but torch.compile failed ({type(exc).__name__}: "
                               f"{exc}); set optim.fused to auto or false") from exc
        log.warning("Lamb: torch.compile of the fused step failed (%s: %s); running timm's eager step",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self._update = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One LAMB step over every parameter with a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("max_grad_norm") is not None:
                raise ValueError("Lamb: internal max_grad_norm clipping is not supported; clip before step()")
            if group.get("caution") or group.get("decoupled_decay"):  # e.g. a timm state_dict with them on
                raise ValueError("Lamb: timm's caution / decoupled_decay are not supported; use timm.optim.Lamb")
            if "step" not in group:
                group["step"] = torch.tensor(0.0)
            group["step"].add_(1)
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            if any(p.grad.is_sparse for p in with_grad):
                raise RuntimeError("Lamb does not support sparse gradients")
            self._step_group(group, with_grad)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        step = group["step"].item()
        beta1, beta2 = group["betas"]
        corrections = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
        adapt = float(group["weight_decay"] != 0 or group["always_adapt"])
        values = [0.0] * 10
        values[LR], values[WEIGHT_DECAY], values[ADAPT] = group["lr"], group["weight_decay"], adapt
        values[BIAS_CORRECTION1], values[BIAS_CORRECTION2] = corrections
        values[BETA1], values[BETA2], values[EPS] = beta1, beta2, group["eps"]
        values[ONE_MINUS_BETA1], values[ONE_MINUS_BETA2] = 1 - beta1, 1 - beta2
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        done = 0 if self._update is None else self._fused_steps(group, params, states, values)
        if done < len(params):
            _eager_steps(group, params[done:], states[done:], values)

    def _fused_steps(self, group: dict, params: list[Tensor], states: list[dict], values: list[float]) -> int:
        """Compiled steps of ``params`` in order; returns how many ran (all, unless compiling failed)."""
        hypers: dict[torch.device, Tensor] = {}
        constants = dict(grad_averaging=group["grad_averaging"], trust_clip=group["trust_clip"])
        for i, (p, state) in enumerate(zip(params, states)):
            if p.device not in hypers:
                hypers[p.device] = torch.tensor(values, dtype=torch.float32, device=p.device)
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if all(t.is_contiguous() for t in tensors):  # 1-D: one graph per size class, whatever the rank
                tensors = tuple(t.view(-1) for t in tensors)
            try:
                self._update(*tensors, hypers[p.device], **constants)
            except Exception as exc:  # compiling failed (before the graph ran): no C++ compiler / Triton, ...
                self._compile_failed(exc)
                return i
        return len(params)


def _eager_steps(group: dict, params: list[Tensor], states: list[dict], values: list[float]) -> None:
    """timm's own functional LAMB step on ``params`` (its single-tensor loop on CPU, foreach on CUDA)."""
    from timm.optim.lamb import lamb

    beta1, beta2 = group["betas"]
    lamb(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
         None, None, lr=values[LR], beta1=beta1, beta2=beta2, beta3=1 - beta1 if group["grad_averaging"] else 1.0,
         bias_correction1=values[BIAS_CORRECTION1], bias_correction2=values[BIAS_CORRECTION2], eps=group["eps"],
         weight_decay=values[WEIGHT_DECAY], decoupled_decay=False, max_lr=None, trust_clip=group["trust_clip"],
         always_adapt=group["always_adapt"], caution=False)
