"""Knowledge distillation: feature taps, the teacher<->student layer map, and the KD loss.

    loss = λ_task·MSE(student, target) + λ_out·MSE(student, teacher)
         + λ_feat·Σ_pairs MSE(student feature, teacher feature) + λ_attn·Σ_pairs MSE(attention maps)
         + λ_self_attn·Σ_pairs MSE(self-attention outputs)

Settings from later papers, each off by default: `feat_norm` divides each feature term by the teacher feature's
mean square (LAPTOP-Diff: large-norm layers stop dominating the sum); `min_snr_gamma` weights the task and
output terms per sample by min(SNR, γ)/SNR (γ/(SNR+1) form for v-prediction; Hang et al.); `attn_temperature` τ
makes attention transfer the classic KD term, τ²·KL(teacher ‖ student) of each head's cross-attention
distribution softened by τ; `self_attn` distills each mapped transformer block's self-attention output (KOALA
found these the most useful KD target).

The target follows the teacher's prediction type (the noise for epsilon, the velocity for
v_prediction). Features are taken with forward hooks at block level (each down/mid/up stage's output,
as BK-SDM), layer level (each resnet and Transformer2DModel output) or transformer level (each resnet and each
transformer block inside, as SSD-1B's distill_sdxl.py hooks them); the map between them comes
from the removal spec, so every pair has the same shape. Hooks live only inside a `Taps` context and
features are dropped when it closes: nothing is kept past the step.

Two lifetimes for the hooks, same loss: `kd_loss(...)` alone registers them for its one call (simple, eager);
`with KDTaps(student, teacher, ...) as taps: kd_loss(..., taps=taps)` registers them once for a whole run, so
teacher and student forwards can run under torch.compile as one graph each (registering or removing a hook
changes the module, which breaks or recompiles the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from models.student import RemovalSpec, spread
from models.teacher import cast_floats

# torch.compile modes whose graphs run as CUDA graphs (KDTaps(cudagraphs=...))
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class KDWeights:
    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    attn: float = 0.0
    self_attn: float = 0.0
    feat_norm: bool = False
    min_snr_gamma: float | None = None
    attn_temperature: float | None = None


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (tuples: down blocks return (h, skips))."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def _attention_logits(attn: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Cross-attention logits q·k·scale of every head: (B, H, HW, T)."""
    q, k = attn.to_q(hidden), attn.to_k(context)
    b, n, _ = q.shape
    h = attn.heads
    q = q.view(b, n, h, -1).transpose(1, 2)  # (B, H, HW, d)
    k = k.view(b, k.shape[1], h, -1).transpose(1, 2)  # (B, H, T, d)
    return q @ k.transpose(-1, -2) * attn.scale


def _attention_map(attn: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities averaged over heads: (B, HW, T)."""
    return torch.softmax(_attention_logits(attn, hidden, context), dim=-1).mean(1)


class Taps:
    """Forward hooks that record the outputs of named submodules (and cross-attention maps).

    As a context: hooks registered on enter, removed (and what they recorded dropped) on exit.
    `attach()`/`detach()` do the same for hooks that stay for a run; `clear()` drops what they recorded."""

    def __init__(self, model: torch.nn.Module, paths: list[str], attn_paths: list[str] = (),
                 attn_logits: bool = False):
        self.model, self.paths, self.attn_paths = model, list(paths), list(attn_paths)
        self.attn_logits = attn_logits  # record each head's logits (B, H, HW, T), not the head-mean map
        self.features: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def attach(self) -> Taps:
        if self._handles:
            return self
        for path in self.paths:
            def hook(_m, _inp, out, path=path):
                self.features[path] = _hidden(out)

            self._handles.append(self.model.get_submodule(path).register_forward_hook(hook))
        for path in self.attn_paths:
            def attn_hook(m, args, kwargs, _out, path=path):
                hidden = args[0] if args else kwargs["hidden_states"]
                context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                context = context if context is not None else hidden
                self.maps[path] = (_attention_logits if self.attn_logits else _attention_map)(m, hidden, context)

            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_hook(attn_hook, with_kwargs=True))
        return self

    def clear(self) -> None:
        self.features.clear()
        self.maps.clear()

    def own(self) -> None:
        """Replace what the hooks recorded by copies (outputs of a CUDA graph are overwritten by its next run)."""
        for store in (self.features, self.maps):
            for k, v in store.items():
                store[k] = v.clone()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> Taps:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


class KDTaps:
    """The taps of the KD loss on teacher and student, registered once for as long as the context is open.

    The pairs taken are those the weights use (features when feat > 0, attention maps when attn > 0, self-attention
    outputs when self_attn > 0). Hooks
    go on the modules inside wrappers (DDP, DeepSpeed, torch.compile), so the wrapped and compiled forwards
    fire them; kd_loss(..., taps=self) clears what they recorded before and after each call.

    `cudagraphs`: the forwards are compiled with CUDA graphs (compile mode reduce-overhead or max-autotune). The
    teacher's no-grad graph and the student's training graph share CUDA graph memory, so the student's run
    overwrites the teacher's output and features: kd_loss then copies them before the student runs, and marks
    each call as a new step."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weights: KDWeights,
                 pairs: list[tuple[str, str]] = (), attn_pairs: list[tuple[str, str]] = (),
                 cudagraphs: bool = False, self_attn_pairs: list[tuple[str, str]] = ()):
        self.cudagraphs = cudagraphs
        self.feat_pairs = list(pairs) if weights.feat > 0 else []
        self.map_pairs = list(attn_pairs) if weights.attn > 0 else []
        self.self_pairs = list(self_attn_pairs) if weights.self_attn > 0 else []
        logits = weights.attn_temperature is not None
        feats = self.feat_pairs + self.self_pairs
        self.student = Taps(unwrapped(student), list(dict.fromkeys(s for s, _ in feats)),
                            [s for s, _ in self.map_pairs], attn_logits=logits)
        self.teacher = Taps(unwrapped(teacher), list(dict.fromkeys(t for _, t in feats)),
                            [t for _, t in self.map_pairs], attn_logits=logits)

    def attach(self) -> KDTaps:
        self.teacher.attach()
        self.student.attach()
        return self

    def clear(self) -> None:
        self.teacher.clear()
        self.student.clear()

    def detach(self) -> None:
        self.teacher.detach()
        self.student.detach()

    def __enter__(self) -> KDTaps:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def _has_down(unet: UNet2DConditionModel, s: int) -> bool:
    return unet.down_blocks[s].downsamplers is not None


def _last_layer(unet: UNet2DConditionModel, s: int) -> str:
    block = unet.down_blocks[s]
    if getattr(block, "attentions", None):
        return f"down_blocks.{s}.attentions.{len(block.attentions) - 1}"
    return f"down_blocks.{s}.resnets.{len(block.resnets) - 1}"


def feature_pairs(
    student: UNet2DConditionModel, teacher: UNet2DConditionModel, spec: RemovalSpec, level: str = "block"
) -> list[tuple[str, str]]:
    """(student module, teacher module) pairs whose outputs have the same shape."""
    k = spec.drop_inner
    pairs: list[tuple[str, str]] = []
    if level == "block":
        for s in range(len(student.down_blocks)):
            if _has_down(student, s) == _has_down(teacher, s):
                pairs.append((f"down_blocks.{s}", f"down_blocks.{s}"))
            else:  # the student's last stage lost its downsampler: compare before the teacher's
                pairs.append((_last_layer(student, s), _last_layer(teacher, s)))
        if student.mid_block is not None and teacher.mid_block is not None:
            pairs.append(("mid_block", "mid_block"))
        for u in range(len(student.up_blocks)):
            pairs.append((f"up_blocks.{u}", f"up_blocks.{u + k}"))
        return pairs
    if level == "transformer":
        return _transformer_level(feature_pairs(student, teacher, spec, "layer"), student, teacher)
    if level != "layer":
        raise ValueError(f"feature level {level!r}: choose block, layer or transformer")
    for s, kept in enumerate(spec.down):
        for j, tj in enumerate(kept):
            pairs.append((f"down_blocks.{s}.resnets.{j}", f"down_blocks.{s}.resnets.{tj}"))
            if getattr(student.down_blocks[s], "attentions", None):
                pairs.append((f"down_blocks.{s}.attentions.{j}", f"down_blocks.{s}.attentions.{tj}"))
    if student.mid_block is not None and teacher.mid_block is not None:
        pairs.append(("mid_block.resnets.0", "mid_block.resnets.0"))
        if getattr(student.mid_block, "attentions", None) and getattr(teacher.mid_block, "attentions", None):
            pairs.append(("mid_block.attentions.0", "mid_block.attentions.0"))
    for u, kept in enumerate(spec.up):
        for j, tj in enumerate(kept):
            pairs.append((f"up_blocks.{u}.resnets.{j}", f"up_blocks.{u + k}.resnets.{tj}"))
            if getattr(student.up_blocks[u], "attentions", None):
                pairs.append((f"up_blocks.{u}.attentions.{j}", f"up_blocks.{u + k}.attentions.{tj}"))
    return pairs


def _block_map(student: UNet2DConditionModel, teacher: UNet2DConditionModel, s_path: str,
               t_path: str) -> list[tuple[int, int]]:
    """(student, teacher) transformer-block indices of a mapped Transformer2DModel: every student block, with the
    teacher block its depth maps to (the spread models/student.py keeps when it thins the depth)."""
    s_depth = len(student.get_submodule(s_path).transformer_blocks)
    t_depth = len(teacher.get_submodule(t_path).transformer_blocks)
    return list(enumerate(spread(t_depth, s_depth)))


def _transformer_level(layer_pairs: list[tuple[str, str]], student: UNet2DConditionModel,
                       teacher: UNet2DConditionModel) -> list[tuple[str, str]]:
    pairs = []
    for s_path, t_path in layer_pairs:
        if ".attentions." not in s_path:
            pairs.append((s_path, t_path))
            continue
        pairs += [(f"{s_path}.transformer_blocks.{j}", f"{t_path}.transformer_blocks.{tj}")
                  for j, tj in _block_map(student, teacher, s_path, t_path)]
    return pairs


def self_attention_pairs(
    student: UNet2DConditionModel, teacher: UNet2DConditionModel, spec: RemovalSpec
) -> list[tuple[str, str]]:
    """Self-attention modules (attn1) of every student transformer block and of the teacher block it maps to."""
    return [(f"{s}.attn1", f"{t}.attn1") for s, t in feature_pairs(student, teacher, spec, "transformer")
            if ".transformer_blocks." in s]


def attention_pairs(
    student: UNet2DConditionModel, teacher: UNet2DConditionModel, spec: RemovalSpec
) -> list[tuple[str, str]]:
    """Cross-attention modules (first kept transformer block of each mapped attention)."""
    pairs = []
    for s_path, t_path in feature_pairs(student, teacher, spec, level="layer"):
        if ".attentions." not in s_path:
            continue
        s_depth = len(student.get_submodule(s_path).transformer_blocks)
        t_depth = len(teacher.get_submodule(t_path).transformer_blocks)
        t_first = spread(t_depth, s_depth)[0]
        pairs.append((f"{s_path}.transformer_blocks.0.attn2", f"{t_path}.transformer_blocks.{t_first}.attn2"))
    return pairs


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def diffusion_batch(scheduler: Any, latents: torch.Tensor, prediction_type: str,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise a batch of clean latents at random timesteps: (noisy, timesteps, target)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                      generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    return noisy, t, training_target(scheduler, latents, noise, t, prediction_type)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def _weighted_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """MSE with a weight per sample (None: the plain MSE)."""
    if w is None:
        return _mse(a, b)
    per_sample = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (per_sample * w).mean()


def feature_term(s_feats: dict[str, torch.Tensor], t_feats: dict[str, torch.Tensor],
                 pairs: list[tuple[str, str]], normalize: bool = False) -> torch.Tensor:
    """Σ over pairs of MSE(student, teacher); with `normalize`, each divided by the teacher feature's mean square
    (LAPTOP-Diff), so every pair counts alike whatever its scale."""
    total = torch.zeros((), device=next(iter(s_feats.values())).device) if s_feats else torch.zeros(())
    for s, t in pairs:
        term = _mse(s_feats[s], t_feats[t])
        if normalize:
            term = term / t_feats[t].float().pow(2).mean().detach().clamp(min=1e-8)
        total = total + term
    return total


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ weighting (Hang et al. 2023), as diffusers' training examples
    compute them: min(SNR, γ)/SNR for epsilon targets, min(SNR, γ)/(SNR + 1) for v-prediction. (B,)"""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def attention_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over batch, heads and query positions: the
    distillation temperature of Hinton et al. where the U-Net has a softmax. Logits (B, H, HW, T)."""
    log_p_s = torch.log_softmax(s_logits.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(t_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


def kd_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: dict[str, Any],
    target: torch.Tensor,
    weights: KDWeights,
    pairs: list[tuple[str, str]] = (),
    attn_pairs: list[tuple[str, str]] = (),
    taps: KDTaps | None = None,
    self_attn_pairs: list[tuple[str, str]] = (),
    alphas_cumprod: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> dict[str, torch.Tensor]:
    """The KD loss and its parts for one batch. `cond` holds the U-Net's keyword arguments
    (encoder_hidden_states, added_cond_kwargs). `student` and `teacher` may be wrapped (DDP, DeepSpeed,
    torch.compile): hooks go on the modules inside. Without `taps`, the hooks of `pairs`, `attn_pairs` and
    `self_attn_pairs` are registered for this call only; with `taps` (open for the run, built with the same pairs
    and weights), those are used and the pair lists are ignored. `alphas_cumprod` (the teacher's schedule, on the
    batch's device) and `prediction_type` are needed for weights.min_snr_gamma."""
    if taps is None:
        with KDTaps(student, teacher, weights, pairs, attn_pairs, self_attn_pairs=self_attn_pairs) as step_taps:
            return kd_loss(student, teacher, noisy, timesteps, cond, target, weights, taps=step_taps,
                           alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)
    use_teacher = weights.out > 0 or weights.feat > 0 or weights.attn > 0 or weights.self_attn > 0
    sample_w = None
    if weights.min_snr_gamma is not None:
        if alphas_cumprod is None:
            raise ValueError("kd_loss: min_snr_gamma needs the teacher's alphas_cumprod")
        sample_w = min_snr_weights(alphas_cumprod, timesteps, weights.min_snr_gamma, prediction_type)
    zero = torch.zeros((), device=noisy.device)
    parts = {"task": zero, "out": zero, "feat": zero, "attn": zero, "self_attn": zero}
    s_tap, t_tap = taps.student, taps.teacher
    taps.clear()  # nothing left from forwards outside the loss (sampling): a compiled graph sees empty stores
    if taps.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    try:
        if use_teacher:
            with torch.no_grad():
                t_dtype = next(teacher.parameters()).dtype
                t_out = teacher(noisy.to(t_dtype), timesteps, **cast_floats(cond, t_dtype)).sample
                if taps.cudagraphs:
                    t_out = t_out.clone()
                    t_tap.own()
        s_out = student(noisy, timesteps, **cond).sample
        parts["task"] = _weighted_mse(s_out, target, sample_w)
        if use_teacher:
            parts["out"] = _weighted_mse(s_out, t_out, sample_w)
        if taps.feat_pairs:
            parts["feat"] = feature_term(s_tap.features, t_tap.features, taps.feat_pairs, weights.feat_norm)
        if taps.self_pairs:
            parts["self_attn"] = feature_term(s_tap.features, t_tap.features, taps.self_pairs, weights.feat_norm)
        if taps.map_pairs:
            tau = weights.attn_temperature
            parts["attn"] = sum(_mse(s_tap.maps[s], t_tap.maps[t]) if tau is None
                                else attention_kl(s_tap.maps[s], t_tap.maps[t], tau) for s, t in taps.map_pairs)
    finally:
        taps.clear()
    total = (weights.task * parts["task"] + weights.out * parts["out"] + weights.feat * parts["feat"]
             + weights.attn * parts["attn"] + weights.self_attn * parts["self_attn"])
    return {"loss": total, **parts}
