"""FP8 linear layers (models/fp8.py, distill.fp8_linear) on CPU, where torch._scaled_mm computes the same
quantized products: close to nn.Linear but not equal, the same parameters and state_dict, only the transformer
layers switched, and back again."""

from __future__ import annotations

import pytest
import torch

from models.fp8 import Float8Linear, fp8_linear_names, fp8_unsupported, to_float8, use_fp8_linear
from pipelines.config import ConfigError, parse_config


def _pair(k: int, n: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    f8 = torch.nn.Linear(k, n)
    f8.load_state_dict(lin.state_dict())
    f8.__class__ = Float8Linear
    return lin, f8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


def test_to_float8_scales_by_the_absolute_max():
    t = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    t8, scale = to_float8(t, torch.float8_e4m3fn)
    assert t8.dtype == torch.float8_e4m3fn
    assert float(t8.float().abs().max()) == torch.finfo(torch.float8_e4m3fn).max  # -2.0 -> -448
    assert torch.allclose(t8.float() * scale, t)  # powers of two: exact


def test_float8_linear_is_close_to_linear_forward_and_backward():
    lin, f8 = _pair(64, 48)
    x = torch.randn(2, 16, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = lin(x1), f8(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    # e4m3 keeps 3 mantissa bits, e5m2 2: a few percent, and not zero (the matmul did run in float8)
    assert 0.005 < _rel(y1, y2) < 0.08
    assert 0.005 < _rel(x1.grad, x2.grad) < 0.12
    assert 0.005 < _rel(lin.weight.grad, f8.weight.grad) < 0.12
    assert torch.allclose(lin.bias.grad, f8.bias.grad)  # the bias is added outside the float8 GEMM
    assert y2.shape == y1.shape and f8.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f8(x).dtype == lin(x).dtype == torch.bfloat16  # what autocast gives a linear layer


def test_float8_linear_falls_back_where_the_gemm_cannot_go():
    lin, f8 = _pair(64, 48)
    x = torch.randn(3, 7, 64)  # 21 tokens: not a multiple of 16
    assert torch.equal(lin(x), f8(x))


def test_use_fp8_linear_switches_the_transformer_layers_only(tmp_path):
    from models.teacher import load_teacher
    from models.tiny import save_tiny

    unet = load_teacher(str(save_tiny("tiny-sd1", tmp_path / "t")), components=("unet",), dtype="float32").unet
    keys = list(unet.state_dict())
    from models.metrics import unet_inputs

    args, kwargs = unet_inputs(unet.config, 2, 16, 16, device="cpu")
    with torch.no_grad():
        before = unet(*args, **kwargs).sample
    names = fp8_linear_names(unet)
    assert use_fp8_linear(unet) == len(names) > 0
    switched = {n for n, m in unet.named_modules() if isinstance(m, Float8Linear)}
    assert switched == set(names) and all(".attentions." in f".{n}" for n in names)
    assert type(unet.time_embedding.linear_1) is torch.nn.Linear  # one row per sample: stays bf16
    assert list(unet.state_dict()) == keys
    with torch.no_grad():
        during = unet(*args, **kwargs).sample
    assert 0 < _rel(before, during) < 0.1
    assert use_fp8_linear(unet, enabled=False) == len(names)
    with torch.no_grad():
        assert torch.equal(unet(*args, **kwargs).sample, before)


def test_fp8_linear_config_and_device_check():
    from pipelines.train import fp8_linears

    with pytest.raises(ConfigError, match="fp8_linear"):
        parse_config({"distill": {"fp8_linear": "yes"}})
    assert fp8_unsupported(torch.device("cpu")) is None
    assert "meta has no FP8 GEMM" in fp8_unsupported(torch.device("meta"))
    student, teacher = torch.nn.Sequential(), torch.nn.Sequential()
    for m in (student, teacher):
        m.attentions = torch.nn.ModuleList([torch.nn.Linear(32, 32)])
    for mode, expect in (("off", 0), ("student", 1), ("both", 2)):
        dc = parse_config({"distill": {"fp8_linear": mode}}).distill
        assert fp8_linears(dc, student, teacher, torch.device("cpu")) == expect
        use_fp8_linear(student, enabled=False)
        use_fp8_linear(teacher, enabled=False)
    dc = parse_config({"distill": {"fp8_linear": "student"}}).distill
    with pytest.raises(ValueError, match="distill.fp8_linear='student': meta has no FP8 GEMM"):
        fp8_linears(dc, student, teacher, torch.device("meta"))
