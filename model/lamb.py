"""LAMB with a fused per-tensor step, in two flavours: timm's math and DeepSpeed's ``FusedLamb`` math (EVA-CLIP's).

Flavours (``Lamb(flavour=...)``, config ``optim.lamb``):

- ``deepspeed`` (the paper's recipe): what EVA-CLIP's pre-training ran. Its commands pass
  ``--optimizer lamb --enable-deepspeed``; ``training/main.py`` then hands no client optimizer to
  ``deepspeed.initialize``, and ``create_deepspeed_config`` writes ``{"type": "LAMB", "params":
  {"bias_correction": true, "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": false, ...}}``, so the
  engine builds ``deepspeed.ops.lamb.FusedLamb`` (wrapped by ZeRO stage 1). Its CUDA kernel
  (``csrc/lamb/fused_lamb_cuda_kernel.cu``), per tensor: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g²``
  (moments NOT bias-corrected inside the update), ``u = m / (sqrt(v) + eps) + wd · p``, trust ratio
  ``‖p‖ / ‖u‖`` clamped to [min_coeff, max_coeff] (1 if either norm is 0) and applied to EVERY group,
  weight decay or not, and the bias correction folded into the step size:
  ``p -= lr · sqrt(1 - b2^t) / (1 - b1^t) · ratio · u``, with ``t`` a per-parameter step count. Under ZeRO
  the "tensor" is each rank's flat partition of a parameter group, so the trust ratio is per partition —
  the same happens here when the trainer hands this optimizer to DeepSpeed with ZeRO (``deepspeed.enabled``,
  ``zero_stage`` >= 1); without ZeRO it is per parameter. The kernel needs CUDA; here the same math is one
  compiled function (:func:`deepspeed_lamb_update_`) that runs on any device, checked against a line-by-line
  transcription of the kernel (``tests/model/test_lamb.py``).
- ``timm``: ``timm.optim.Lamb`` (NVLAMB): bias-corrected moments inside the update, weight decay added after
  the correction, trust ratio unclamped and skipped on groups without weight decay (``always_adapt`` off).

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
``False`` runs eagerly. The timm flavour's eager step is timm's own functional ``lamb`` (its single-tensor
loop on CPU, its foreach path on CUDA), i.e. exactly ``timm.optim.Lamb``; compiled and eager agree up to
float rounding (~1e-5 relative after 100 steps, ``benchmarks/lamb_step.py``). The deepspeed flavour's eager
step is :func:`deepspeed_lamb_update_` uncompiled.

State and checkpoints: timm flavour as timm's ``Lamb`` (``state[p] = {"exp_avg", "exp_avg_sq"}``, a CPU
float ``group["step"]`` per group), so either optimizer resumes the other's state; deepspeed flavour as
``FusedLamb`` (``state[p] = {"step", "exp_avg", "exp_avg_sq"}``, ``step`` an int per parameter), plus the
group step.

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
Flavour = Literal["timm", "deepspeed"]
FLAVOURS: tuple[str, ...] = ("timm", "deepspeed")
#: Index of each per-(group, step) hyper-parameter in the ``hyper`` tensor of :func:`lamb_update_`.
LR, WEIGHT_DECAY, ADAPT, BIAS_CORRECTION1, BIAS_CORRECTION2, BETA1, BETA2, ONE_MINUS_BETA1, ONE_MINUS_BETA2, EPS = \
    range(10)
#: Index of each hyper-parameter in the ``hyper`` tensor of :func:`deepspeed_lamb_update_`.
DS_STEP_SIZE, DS_WEIGHT_DECAY, DS_BETA1, DS_BETA2, DS_ONE_MINUS_BETA1, DS_ONE_MINUS_BETA2, DS_EPS, DS_MIN_COEFF, \
    DS_MAX_COEFF = range(9)


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


def deepspeed_lamb_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hyper: Tensor, *,
                           eps_inside_sqrt: bool) -> None:
    """One tensor's step of DeepSpeed's ``FusedLamb`` (``lamb_cuda_kernel_part1..3``), in place.

    Args:
        param, grad, exp_avg, exp_avg_sq: same shape and device (a parameter, or a ZeRO flat partition).
        hyper: ``(9,)`` float32, indexed by the ``DS_*`` constants: step size ``lr · sqrt(1 - b2^t) / (1 - b1^t)``
            (``lr`` without bias correction), weight decay, b1, b2, 1 - b1, 1 - b2 (float32, as the kernel
            computes them), eps, min_coeff, max_coeff.
        eps_inside_sqrt: ``sqrt(v + eps)`` (the kernel's mode 0) instead of ``sqrt(v) + eps`` (mode 1).
    """
    exp_avg.mul_(hyper[DS_BETA1]).add_(grad * hyper[DS_ONE_MINUS_BETA1])
    exp_avg_sq.mul_(hyper[DS_BETA2]).add_(hyper[DS_ONE_MINUS_BETA2] * grad * grad)
    eps = hyper[DS_EPS]
    denom = (exp_avg_sq + eps).sqrt() if eps_inside_sqrt else exp_avg_sq.sqrt() + eps
    update = exp_avg / denom + hyper[DS_WEIGHT_DECAY] * param
    w_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
    ratio = torch.where((w_norm != 0) & (u_norm != 0),
                        torch.clamp(w_norm / u_norm, hyper[DS_MIN_COEFF], hyper[DS_MAX_COEFF]), 1.0)
    param.sub_(update * (hyper[DS_STEP_SIZE] * ratio))


def deepspeed_hyper(lr: float, weight_decay: float, betas: tuple[float, float], eps: float, step: int,
                    bias_correction: bool, trust_range: tuple[float, float]) -> list[float]:
    """The ``hyper`` values of :func:`deepspeed_lamb_update_` at per-parameter step ``step`` (1-based), rounded as
    ``fused_lamb_cuda`` rounds them (float32 arguments, the bias corrections from double ``pow``)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    beta1, beta2 = f32(betas[0]), f32(betas[1])
    step_size = f32(lr)
    if bias_correction:
        correction1 = f32(1 - float(beta1) ** step)
        correction2 = f32(1 - float(beta2) ** step)
        step_size = step_size * correction2.sqrt() / correction1
    return [float(step_size), weight_decay, float(beta1), float(beta2), float(1 - beta1), float(1 - beta2), eps,
            trust_range[0], trust_range[1]]


_UPDATES: dict[str, Callable[..., None]] = {"timm": lamb_update_, "deepspeed": deepspeed_lamb_update_}
_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_update(flavour: str = "timm") -> Callable[..., None]:
    """The flavour's update through ``torch.compile`` (one wrapper per process; dynamo caches its graphs)."""
    if flavour not in _COMPILED:
        _COMPILED[flavour] = torch.compile(_UPDATES[flavour], dynamic=True, fullgraph=True)
    return _COMPILED[flavour]


class Lamb(torch.optim.Optimizer):
    """LAMB with a compiled per-tensor step: timm's ``Lamb`` (``max_grad_norm=None``) or DeepSpeed's ``FusedLamb``.

    Args:
        params: parameters or groups (each group may set ``lr``, ``weight_decay``, ...).
        lr, bias_correction, betas, eps, weight_decay, grad_averaging, trust_clip, always_adapt: timm's
            ``Lamb`` arguments of the same names and defaults. As there, the trust ratio is skipped on
            groups with ``weight_decay == 0`` unless ``always_adapt``. The deepspeed flavour uses lr,
            bias_correction, betas, eps, weight_decay and refuses the other three when not at their defaults.
        fused: ``"auto"`` (compile, else eager with a warning), ``True`` (compile or raise), ``False``.
        flavour: ``"timm"`` or ``"deepspeed"`` (module doc).
        trust_range: deepspeed flavour: (min_coeff, max_coeff), the clamp of the trust ratio (EVA-CLIP: 0.01, 10).
        eps_inside_sqrt: deepspeed flavour: ``sqrt(v + eps)`` (EVA-CLIP: false).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, trust_clip: bool = False, always_adapt: bool = False,
                 fused: Fused = "auto", flavour: Flavour = "timm", trust_range: tuple[float, float] = (0.01, 10.0),
                 eps_inside_sqrt: bool = False):
        if fused not in (True, False, "auto"):
            raise ValueError(f"Lamb: fused must be true, false or 'auto', got {fused!r}")
        if flavour not in FLAVOURS:
            raise ValueError(f"Lamb: flavour must be one of {FLAVOURS}, got {flavour!r}")
        if flavour == "deepspeed" and (not grad_averaging or trust_clip or always_adapt):
            raise ValueError("Lamb: grad_averaging / trust_clip / always_adapt are timm options; DeepSpeed's "
                             "FusedLamb always averages, clamps the trust ratio to trust_range and adapts every group")
        if not 0 < trust_range[0] <= trust_range[1]:
            raise ValueError(f"Lamb: trust_range must be 0 < min <= max, got {trust_range}")
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"Lamb: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, trust_clip=trust_clip,
                        always_adapt=always_adapt, max_grad_norm=None)
        if flavour == "deepspeed":
            defaults.update(trust_range=tuple(trust_range), eps_inside_sqrt=eps_inside_sqrt)
        super().__init__(params, defaults)
        self.fused = fused
        self.flavour = flavour
        self._update: Callable[..., None] | None = None
        if fused is not False:
            try:
                self._update = _compiled_update(flavour)
            except Exception as exc:  # torch.compile unavailable (e.g. an unsupported Python)
                self._compile_failed(exc)

    def _compile_failed(self, exc: Exception) -> None:
        """``fused: true``: a clear error; ``auto``: one warning, then timm's eager step from here on."""
        if self.fused is True:
            raise RuntimeError(f"Lamb: optim.fused is true but torch.compile failed ({type(exc).__name__}: "
                               f"{exc}); set optim.fused to auto or false") from exc
        log.warning("Lamb: torch.compile of the fused step failed (%s: %s); running the eager %s step",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", self.flavour)
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
            if self.flavour == "deepspeed":
                self._deepspeed_step_group(group, with_grad)
            else:
                self._step_group(group, with_grad)
        return loss

    def _deepspeed_step_group(self, group: dict, params: list[Tensor]) -> None:
        """``FusedLamb.step`` for one group: per-parameter step counts, one update per tensor."""
        hypers: dict[tuple[torch.device, int], Tensor] = {}
        update = self._update or deepspeed_lamb_update_
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            elif "step" not in state:  # a timm-flavour state: its steps are the group's (already counted here)
                state["step"] = int(group["step"].item()) - 1
            state["step"] += 1
            key = (p.device, state["step"])
            if key not in hypers:
                values = deepspeed_hyper(group["lr"], group["weight_decay"], group["betas"], group["eps"],
                                         state["step"], group["bias_correction"], group["trust_range"])
                hypers[key] = torch.tensor(values, dtype=torch.float32, device=p.device)
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if all(t.is_contiguous() for t in tensors):
                tensors = tuple(t.view(-1) for t in tensors)
            try:
                update(*tensors, hypers[key], eps_inside_sqrt=group["eps_inside_sqrt"])
            except Exception as exc:  # compiling failed (before the graph ran)
                if update is deepspeed_lamb_update_:
                    raise
                self._compile_failed(exc)
                update = deepspeed_lamb_update_
                update(*tensors, hypers[key], eps_inside_sqrt=group["eps_inside_sqrt"])

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
