"""model.lamb.Lamb: same steps as timm's Lamb (compiled and eager), state_dict round trips, compile fallback."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from timm.optim import Lamb as TimmLamb
from torch import nn

import model.lamb as lamb_module
from data_schemas.train_config import OptimSection
from model.factory import create_umg_clip
from model.lamb import Lamb
from model.schedule import build_optimizer, param_groups

RTOL, ATOL = 2e-5, 1e-7  # float32 rounding: inductor fuses and reorders the elementwise ops and norm sums


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _groups(net: nn.Module) -> list[dict]:
    """Three groups: decayed weights at two learning rates, and no-decay norms / biases."""
    first, norm, last = net[0], net[1], net[2]
    return [{"params": [first.weight], "lr": 3e-2, "weight_decay": 0.1},
            {"params": [last.weight], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [first.bias, norm.weight, norm.bias, last.bias], "lr": 2e-2, "weight_decay": 0.0}]


def _run(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    """``steps`` steps on fresh random gradients (same sequence for the same seed), one gradient left unset."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(net.parameters()):
            p.grad = None if (i == 3 and step == 1) else torch.randn(p.shape, generator=gen) * 0.1
        opt.step()


def _assert_same(net: nn.Module, ref: nn.Module, opt: torch.optim.Optimizer, ref_opt: torch.optim.Optimizer):
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=RTOL, atol=ATOL, msg=name)
    assert [float(g["step"]) for g in opt.param_groups] == [float(g["step"]) for g in ref_opt.param_groups]


@pytest.mark.parametrize("betas", [(0.9, 0.98), (0.8, 0.999)])  # one process: the 2nd reuses the 1st's graphs
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
def test_matches_timm_lamb_over_steps_with_wd_and_no_wd_groups(fused, betas):
    """Eager is timm's own step (checks our state and group bookkeeping); compiled is our fused update."""
    net, ref = _net(), _net()
    kwargs = dict(lr=1e-2, betas=betas, eps=1e-6, weight_decay=0.05)
    opt, ref_opt = Lamb(_groups(net), fused=fused, **kwargs), TimmLamb(_groups(ref), max_grad_norm=None, **kwargs)
    try:
        _run(net, opt, 5)
    except RuntimeError as exc:
        if "torch.compile failed" in str(exc):
            pytest.skip(f"no torch.compile backend here: {exc}")
        raise
    _run(ref, ref_opt, 5)
    _assert_same(net, ref, opt, ref_opt)
    assert (net[0].weight - _net()[0].weight).abs().max() > 1e-3  # it did train


@pytest.mark.parametrize("options", [
    dict(always_adapt=True), dict(trust_clip=True), dict(grad_averaging=False), dict(bias_correction=False),
    dict(weight_decay=0.0)])
def test_our_update_matches_timm_lamb_for_each_option(options, monkeypatch):
    """:func:`lamb_update_` itself, run eagerly (no compiler needed), for every option timm and we share."""
    monkeypatch.setattr(lamb_module, "_compiled_update", lambda flavour="timm": lamb_module.lamb_update_)
    net, ref = _net(), _net()
    groups, ref_groups = _groups(net), _groups(ref)
    if "weight_decay" in options:  # every group without decay: no trust ratio anywhere
        for g in groups + ref_groups:
            g["weight_decay"] = 0.0
    kwargs = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-8, **options)
    opt, ref_opt = Lamb(groups, fused=True, **kwargs), TimmLamb(ref_groups, max_grad_norm=None, **kwargs)
    _run(net, opt, 4)
    _run(ref, ref_opt, 4)
    _assert_same(net, ref, opt, ref_opt)


def test_layer_decay_groups_of_the_tiny_model_match_timm_under_a_changing_lr():
    """build_optimizer's groups (towers x layers x decay) with a per-step schedule, as the trainer runs it."""
    torch.manual_seed(0)
    umg = create_umg_clip("umg-tiny-vit")
    ref = copy.deepcopy(umg)
    optim = OptimSection(lr=5e-2, visual_lr=2e-2, visual_ld=0.7, text_ld=0.9, weight_decay=0.5)
    opt = build_optimizer(umg, optim)
    ref_opt = TimmLamb(param_groups(ref, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                       weight_decay=optim.weight_decay, max_grad_norm=None)
    assert isinstance(opt, Lamb) and len(opt.param_groups) > 10
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        for o in (opt, ref_opt):
            for g in o.param_groups:
                g["lr"] = g.setdefault("initial_lr", g["lr"]) * (1 - 0.3 * step)
        for p, q in zip(umg.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(umg.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _saved(opt: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("first", ["ours", "timm"])
def test_state_dict_resume_continues_exactly_and_loads_timm_state(first):
    """3 steps, save, load into a fresh ``Lamb``, 3 more == 6 steps straight (and timm's state resumes in ours)."""
    whole = _net()
    whole_opt = Lamb(_groups(whole))  # fused: auto, as the trainer runs it
    _run(whole, whole_opt, 3, seed=0)
    _run(whole, whole_opt, 3, seed=1)

    part = _net()
    part_opt = (Lamb(_groups(part)) if first == "ours"
                else TimmLamb(_groups(part), weight_decay=0.01, max_grad_norm=None))
    _run(part, part_opt, 3, seed=0)
    resumed_opt = Lamb(_groups(part))
    resumed_opt.load_state_dict(_saved(part_opt))
    _run(part, resumed_opt, 3, seed=1)
    _assert_same(part, whole, resumed_opt, whole_opt)  # timm's first three steps may differ by rounding only
    if first == "ours":
        assert all(torch.equal(p, q) for p, q in zip(part.parameters(), whole.parameters()))


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(lamb_module, "_compiled_update", lambda flavour="timm": broken)
    net, ref = _net(), _net()
    opt, eager = Lamb(_groups(net), fused="auto"), Lamb(_groups(ref), fused=False)
    with caplog.at_level(logging.WARNING, logger="model.lamb"):
        _run(net, opt, 2)
    _run(ref, eager, 2)
    assert opt._update is None and "running the eager timm step" in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))

    strict = Lamb(_groups(_net()), fused=True)
    _grads(strict)
    with pytest.raises(RuntimeError, match="optim.fused is true but torch.compile failed"):
        strict.step()


def test_auto_runs_eagerly_when_torch_compile_itself_is_unavailable(monkeypatch, caplog):
    def unavailable(flavour="timm"):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(lamb_module, "_compiled_update", unavailable)
    with caplog.at_level(logging.WARNING, logger="model.lamb"):
        opt = Lamb(_groups(_net()), fused="auto")
    assert opt._update is None and "not supported on this Python" in caplog.text
    with pytest.raises(RuntimeError, match="optim.fused is true but torch.compile failed"):
        Lamb(_groups(_net()), fused=True)


def _grads(opt: torch.optim.Optimizer) -> None:
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="fused must be true, false or 'auto'"):
        Lamb(_net().parameters(), fused="yes")
    with pytest.raises(ValueError, match="betas"):
        Lamb(_net().parameters(), betas=(0.9, 1.0))
    opt = Lamb(_net().parameters(), fused=False)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    _grads(opt)
    with pytest.raises(ValueError, match="max_grad_norm clipping is not supported"):
        opt.step()
    opt.param_groups[0].update(max_grad_norm=None, caution=True)  # as loaded from a timm state_dict
    with pytest.raises(ValueError, match="caution / decoupled_decay are not supported"):
        opt.step()
    with pytest.raises(ValueError):
        OptimSection(fused="sometimes")


# ---- flavour "deepspeed": DeepSpeed's FusedLamb (EVA-CLIP's pre-training optimizer) -----------------------------


def _fused_lamb_kernel(p, m, v, g, lr, beta1, beta2, max_coeff, min_coeff, eps, grad_scale, step, mode,
                       bias_correction, decay):
    """DeepSpeed ``csrc/lamb/fused_lamb_cuda_kernel.cu`` ``fused_lamb_cuda`` transcribed line by line (float32
    tensors for the kernel's per-element loops and block reductions; the host constants as the C++ computes them).
    Returns the lamb coefficient (``lamb_coeff_val``)."""
    import math

    import numpy as np

    f32 = np.float32
    # host: step_size
    if bias_correction == 1:
        bias_correction1 = f32(1 - math.pow(f32(beta1), step))  # std::pow(float, int) -> double, stored as float
        bias_correction2 = f32(1 - math.pow(f32(beta2), step))
        step_size = f32(f32(lr) * np.sqrt(bias_correction2)) / bias_correction1
    else:
        step_size = f32(lr)
    b1, b2, eps, decay = f32(beta1), f32(beta2), f32(eps), f32(decay)
    # part 1: moments, update, squared norms
    scaled_grad = g / f32(grad_scale)
    pj = p.clone()
    m.copy_(float(b1) * m + float(f32(1) - b1) * scaled_grad)
    v.copy_(float(b2) * v + float(f32(1) - b2) * scaled_grad * scaled_grad)
    denom = torch.sqrt(v + float(eps)) if mode == 0 else torch.sqrt(v) + float(eps)
    update = (m / denom) + (float(decay) * p)
    u_l2 = (update * update).sum()
    w_l2 = (pj * pj).sum()
    # part 3: coefficient and parameter write
    reg_w, reg_u = torch.sqrt(w_l2), torch.sqrt(u_l2)
    lamb_coeff = 1.0
    if reg_w != 0 and reg_u != 0:
        lamb_coeff = float(reg_w / reg_u)
        if lamb_coeff > max_coeff:
            lamb_coeff = max_coeff
        if lamb_coeff < min_coeff:
            lamb_coeff = min_coeff
    denom = torch.sqrt(v + float(eps)) if mode == 0 else torch.sqrt(v) + float(eps)
    update = (m / denom) + (float(decay) * p)
    p.copy_(p - (float(step_size) * float(f32(lamb_coeff)) * update))
    return lamb_coeff


class _FusedLambReference:
    """``deepspeed.ops.lamb.FusedLamb.step`` (no grads/output_params/scale arguments, max_grad_norm 0) over the
    kernel transcription: per-parameter ``state['step']``, parameters without a gradient skipped."""

    def __init__(self, groups, lr, betas, eps, weight_decay, max_coeff=10.0, min_coeff=0.01, eps_inside_sqrt=False):
        self.groups = [{"lr": lr, "weight_decay": weight_decay, **g} for g in groups]
        self.betas, self.eps, self.max_coeff, self.min_coeff = betas, eps, max_coeff, min_coeff
        self.eps_mode = 0 if eps_inside_sqrt else 1
        self.state, self.lamb_coeffs = {}, []

    @torch.no_grad()
    def step(self):
        self.lamb_coeffs = []
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                self.lamb_coeffs.append(_fused_lamb_kernel(
                    p, state["exp_avg"], state["exp_avg_sq"], p.grad, group["lr"], *self.betas, self.max_coeff,
                    self.min_coeff, self.eps, 1.0, state["step"], self.eps_mode, 1, group["weight_decay"]))


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
def test_deepspeed_flavour_matches_a_transcription_of_fused_lamb_kernel(fused, eps_inside_sqrt):
    """Our deepspeed flavour (compiled and eager) vs the kernel transcription: decay and no-decay groups (the
    trust ratio applies to both), a parameter skipping a step (per-parameter step counts), and both clamps hit."""
    net, ref = _net(), _net()
    with torch.no_grad():  # a large weight with small updates (ratio > 10) and a tiny one (ratio < 0.01)
        for n in (net, ref):
            n[2].weight.mul_(1e3)
            n[1].bias.fill_(1e-5)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    opt = Lamb(_groups(net), fused=fused, flavour="deepspeed", eps_inside_sqrt=eps_inside_sqrt, **kwargs)
    ref_opt = _FusedLambReference(_groups(ref), eps_inside_sqrt=eps_inside_sqrt, **kwargs)
    coeffs = []
    gen = torch.Generator().manual_seed(0)
    try:
        for step in range(5):
            for i, (p, q) in enumerate(zip(net.parameters(), ref.parameters())):
                p.grad = None if (i == 3 and step == 1) else torch.randn(p.shape, generator=gen) * 0.1
                q.grad = None if p.grad is None else p.grad.clone()
            opt.step()
            ref_opt.step()
            coeffs += ref_opt.lamb_coeffs
    except RuntimeError as exc:
        if "torch.compile failed" in str(exc):
            pytest.skip(f"no torch.compile backend here: {exc}")
        raise
    assert 10.0 in coeffs and 0.01 in coeffs and any(0.01 < c < 10.0 for c in coeffs)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=RTOL, atol=ATOL, msg=name)
        assert opt.state[p]["step"] == ref_opt.state[q]["step"]
    assert opt.state[net[1].bias]["step"] == 4  # skipped one step: per-parameter counts, as FusedLamb
    # not timm's math: the trust ratio on no-decay groups, the clamp and the bias-correction placement differ
    timm_net = _net()
    with torch.no_grad():
        timm_net[2].weight.mul_(1e3)
        timm_net[1].bias.fill_(1e-5)
    timm_opt = TimmLamb(_groups(timm_net), max_grad_norm=None, **kwargs)
    _run(timm_net, timm_opt, 5)
    assert (timm_net[0].weight - net[0].weight).abs().max() > 1e-4


def test_deepspeed_flavour_rejects_timm_only_options_and_resumes_its_state():
    with pytest.raises(ValueError, match="timm options"):
        Lamb(_net().parameters(), flavour="deepspeed", trust_clip=True)
    with pytest.raises(ValueError, match="flavour"):
        Lamb(_net().parameters(), flavour="apex")
    whole = _net()
    whole_opt = Lamb(_groups(whole), flavour="deepspeed", fused=False)
    _run(whole, whole_opt, 3, seed=0)
    _run(whole, whole_opt, 3, seed=1)
    part = _net()
    part_opt = Lamb(_groups(part), flavour="deepspeed", fused=False)
    _run(part, part_opt, 3, seed=0)
    resumed = Lamb(_groups(part), flavour="deepspeed", fused=False)
    resumed.load_state_dict(_saved(part_opt))
    _run(part, resumed, 3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(part.parameters(), whole.parameters()))
