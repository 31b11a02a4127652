"""FP8 matmuls for the U-Nets' transformer linear layers (distill.fp8_linear).

On GPUs with FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper, Blackwell) a float8 GEMM runs at
twice the bf16 rate. `use_fp8_linear` switches the linear layers inside a U-Net's transformer blocks
(attention q/k/v/out, feed-forward, SDXL's linear projections) to `Float8Linear`, which multiplies in float8
with one scale per tensor taken from its absolute max at every call ("dynamic tensorwise" scaling, the default
recipe of torchao.float8): weights and activations as e4m3, gradients as e5m2, outputs and the weights
themselves (master weights, optimizer) in their own dtype. The forward GEMM accumulates with cuBLAS's fast
accumulation, the two backward GEMMs without it.

The switch changes the module's class only: parameters, hooks and state_dict keys are nn.Linear's, so
checkpoints, EMA and the exported student are the same as without it. Convolutions (most of an SD 1.x U-Net's
FLOPs, and its 1x1 projections) stay in bf16: PyTorch has no FP8 convolution. A layer whose shapes the FP8 GEMM
cannot take (every dimension must be a multiple of 16, the token count too) runs as a plain nn.Linear.
On CPU, torch._scaled_mm computes the same quantized product (slowly): for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_CAPABILITY = (8, 9)


def fp8_unsupported(device: torch.device) -> str | None:
    """Why `device` cannot run FP8 GEMMs, or None when it can (CPU: yes, for tests)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{device.type} has no FP8 GEMM in PyTorch"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is compute capability {cap[0]}.{cap[1]}; FP8 tensor cores "
                f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)")
    return None


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` scaled by its absolute max into `dtype`'s range -> (the float8 tensor, the float32 scale that undoes
    the scaling, as torch._scaled_mm takes it)."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    return (t.float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype), amax / fmax


class _Float8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K)^T -> (M, N) in float8. torch._scaled_mm wants its first operand row-major and
    its second column-major, so the backward transposes the float8 copies it saved (cheap: one byte each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, sx = to_float8(x, E4M3)
        w8, sw = to_float8(weight, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)  # float8 copies: half the activation memory of bf16
        ctx.dtypes = (x.dtype, weight.dtype)
        return torch._scaled_mm(x8, w8.t(), sx, sw, out_dtype=out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, sg = to_float8(grad.contiguous(), E5M2)
        # grad_x (M, K) = grad (M, N) @ weight (N, K)
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), sg, sw, out_dtype=x_dtype)
        # grad_w (N, K) = grad^T (N, M) @ x (M, K)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), sg, sx, out_dtype=w_dtype)
        return grad_x, grad_w, None


def fp8_fits(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether the FP8 GEMMs of a linear layer take these sizes (all multiples of 16)."""
    return tokens % 16 == 0 and in_features % 16 == 0 and out_features % 16 == 0


class Float8Linear(torch.nn.Linear):
    """nn.Linear whose matmul runs in float8 (see the module docstring); same parameters, same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        tokens = x.numel() // k
        if not fp8_fits(tokens, self.in_features, self.out_features):
            return F.linear(x, self.weight, self.bias)
        device = x.device.type
        # the output dtype autocast would give a linear layer (bf16 under bf16 autocast), else the input's
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _Float8Matmul.apply(x.reshape(tokens, k).contiguous(), self.weight, out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*lead, self.out_features)


def fp8_linear_names(unet: torch.nn.Module) -> list[str]:
    """The linear layers `use_fp8_linear` switches: those inside the transformer blocks (module paths through an
    `attentions` list), where the tokens are many; not the time and class embeddings (a row per sample)."""
    return [name for name, m in unet.named_modules()
            if type(m) is torch.nn.Linear and ".attentions." in f".{name}"
            and fp8_fits(16, m.in_features, m.out_features)]


def use_fp8_linear(unet: torch.nn.Module, enabled: bool = True) -> int:
    """Switch the U-Net's transformer linear layers to Float8Linear in place (enabled=False: back to nn.Linear);
    the number switched."""
    if enabled:
        names, cls = fp8_linear_names(unet), Float8Linear
    else:
        names, cls = [name for name, m in unet.named_modules() if type(m) is Float8Linear], torch.nn.Linear
    for name in names:
        unet.get_submodule(name).__class__ = cls
    return len(names)
