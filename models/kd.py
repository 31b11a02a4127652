"""Knowledge distillation: feature taps, the teacher<->student layer map, and the KD loss.

    loss = λ_task·MSE(student, target) + λ_out·MSE(student, teacher)
         + λ_feat·Σ_pairs MSE(student feature, teacher feature) + λ_attn·Σ_pairs MSE(attention maps)

The target follows the teacher's prediction type (the noise for epsilon, the velocity for
v_prediction). Features are taken with forward hooks at block level (each down/mid/up stage's output,
as BK-SDM) or layer level (each resnet and transformer output, as SSD-1B); the map between them comes
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

# torch.compile modes whose graphs run as CUDA graphs (KDTaps(cudagraphs=...))
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class KDWeights:
    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    attn: float = 0.0


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (tuples: down blocks return (h, skips))."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def _attention_map(attn: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities averaged over heads: (B, HW, T)."""
    q, k = attn.to_q(hidden), attn.to_k(context)
    b, n, _ = q.shape
    h = attn.heads
    q = q.view(b, n, h, -1).transpose(1, 2)  # (B, H, HW, d)
    k = k.view(b, k.shape[1], h, -1).transpose(1, 2)  # (B, H, T, d)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)


class Taps:
    """Forward hooks that record the outputs of named submodules (and cross-attention maps).

    As a context: hooks registered on enter, removed (and what they recorded dropped) on exit.
    `attach()`/`detach()` do the same for hooks that stay for a run; `clear()` drops what they recorded."""

    def __init__(self, model: torch.nn.Module, paths: list[str], attn_paths: list[str] = ()):
        self.model, self.paths, self.attn_paths = model, list(paths), list(attn_paths)
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
                self.maps[path] = _attention_map(m, hidden, context if context is not None else hidden)

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

    The pairs taken are those the weights use (features when feat > 0, attention maps when attn > 0). Hooks
    go on the modules inside wrappers (DDP, DeepSpeed, torch.compile), so the wrapped and compiled forwards
    fire them; kd_loss(..., taps=self) clears what they recorded before and after each call.

    `cudagraphs`: the forwards are compiled with CUDA graphs (compile mode reduce-overhead or max-autotune). The
    teacher's no-grad graph and the student's training graph share CUDA graph memory, so the student's run
    overwrites the teacher's output and features: kd_loss then copies them before the student runs, and marks
    each call as a new step."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weights: KDWeights,
                 pairs: list[tuple[str, str]] = (), attn_pairs: list[tuple[str, str]] = (),
                 cudagraphs: bool = False):
        self.cudagraphs = cudagraphs
        self.feat_pairs = list(pairs) if weights.feat > 0 else []
        self.map_pairs = list(attn_pairs) if weights.attn > 0 else []
        self.student = Taps(unwrapped(student), [s for s, _ in self.feat_pairs], [s for s, _ in self.map_pairs])
        self.teacher = Taps(unwrapped(teacher), [t for _, t in self.feat_pairs], [t for _, t in self.map_pairs])

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
    if level != "layer":
        raise ValueError(f"feature level {level!r}: choose block or layer")
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


def _cast(cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for key, v in cond.items():
        if isinstance(v, dict):
            out[key] = _cast(v, dtype)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[key] = v.to(dtype)
        else:
            out[key] = v
    return out


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
) -> dict[str, torch.Tensor]:
    """The KD loss and its parts for one batch. `cond` holds the U-Net's keyword arguments
    (encoder_hidden_states, added_cond_kwargs). `student` and `teacher` may be wrapped (DDP, DeepSpeed,
    torch.compile): hooks go on the modules inside. Without `taps`, the hooks of `pairs` and `attn_pairs` are
    registered for this call only; with `taps` (open for the run, built with the same pairs and weights),
    those are used and `pairs`/`attn_pairs` are ignored."""
    if taps is None:
        with KDTaps(student, teacher, weights, pairs, attn_pairs) as step_taps:
            return kd_loss(student, teacher, noisy, timesteps, cond, target, weights, taps=step_taps)
    use_teacher = weights.out > 0 or weights.feat > 0 or weights.attn > 0
    zero = torch.zeros((), device=noisy.device)
    parts = {"task": zero, "out": zero, "feat": zero, "attn": zero}
    s_tap, t_tap = taps.student, taps.teacher
    taps.clear()  # nothing left from forwards outside the loss (sampling): a compiled graph sees empty stores
    if taps.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    try:
        if use_teacher:
            with torch.no_grad():
                t_dtype = next(teacher.parameters()).dtype
                t_out = teacher(noisy.to(t_dtype), timesteps, **_cast(cond, t_dtype)).sample
                if taps.cudagraphs:
                    t_out = t_out.clone()
                    t_tap.own()
        s_out = student(noisy, timesteps, **cond).sample
        parts["task"] = _mse(s_out, target)
        if use_teacher:
            parts["out"] = _mse(s_out, t_out)
        if taps.feat_pairs:
            parts["feat"] = sum(_mse(s_tap.features[s], t_tap.features[t]) for s, t in taps.feat_pairs)
        if taps.map_pairs:
            parts["attn"] = sum(_mse(s_tap.maps[s], t_tap.maps[t]) for s, t in taps.map_pairs)
    finally:
        taps.clear()
    total = (weights.task * parts["task"] + weights.out * parts["out"] + weights.feat * parts["feat"]
             + weights.attn * parts["attn"])
    return {"loss": total, **parts}
