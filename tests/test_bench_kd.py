"""The KD throughput benchmarks' own logic, on CPU: lever parsing, kernel kinds and the profile table of
bench/distill_throughput.py, and the attention shapes bench/sdpa_backends.py records from a meta forward."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench import distill_throughput as dt
from bench import sdpa_backends as sb


def test_levers_take_attention_and_layout_modifiers():
    rows = dt.parse_levers("ref+sdpa-cudnn,ddp+compile+nhwcbwd+sdpa-flash,ours+z3+nhwcbwd")
    assert [dt.sdpa_backend(r) for r in rows] == ["cudnn", "flash", "auto"]
    args = argparse.Namespace(zero_stage=2, tiny=False)
    assert "cudnn attention first" in dt.describe(rows[0], args)
    assert "layout optimization forced" in dt.describe(rows[2], args)
    with pytest.raises(SystemExit, match="sdpa-fa3"):
        dt.parse_levers("ddp+sdpa-fa3")


@pytest.mark.parametrize("name,kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "matmul"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedOptimizerTensorListMetadata<4>>", "optimizer"),
    ("triton_poi_fused_cat_gelu_gelu_backward_mul_split_view_15", "triton"),
    ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>", "copy"),
    ("void at::native::vectorized_layer_norm_kernel<float, float, false>", "other"),
])
def test_kernel_kinds(name, kind):
    assert dt.kernel_kind(name) == kind


def test_profile_table_is_per_timed_step():
    args = argparse.Namespace(teacher="sd15", preset="bk-tiny", resolution=64, tiny=True, steps=3, warmup=1)
    ref = {**dt.blank(dt.parse_levers("ref")[0], argparse.Namespace(zero_stage=2, tiny=True, batch=4,
                                                                      big_batch=8), 1),
           "samples_per_s": 40.0, "warmup_s": 1.0, "mem_gb": None, "wall_s": 2.0,
           "profile": {"gpu_ms": 90.0, "kinds": {"convolution": 50.0, "copy": 40.0}, "top": [], "copy_sources": []}}
    text = dt.table(args, [ref], 5.0)
    row = next(line for line in text.splitlines() if line.startswith("| `ref` | 100.0 |"))
    # 4 samples at 40 samples/s: a 100 ms step, 90 ms of it in kernels; each kind as a share of the step
    assert "| 90.0 (90%) |" in row and "| 50.0 (50%) |" in row and "| 40.0 (40%) |" in row
    assert "| 0.0 (0%) |" in row  # kinds the profile did not see
    # model FLOPs by kind (meta device: the teacher's forward, the student's forward and backward as run) add up to
    # about the total of model_flops (which takes a backward as 2 forwards; the real one skips the input's
    # gradient); the convolution kernels' rate is 4 samples of its FLOPs in 50 ms
    kinds, total = dt.op_tflops(args), dt.model_flops(args)["tflop_per_sample"]
    assert set(kinds) >= {"convolution", "matmul", "attention"}
    assert sum(kinds.values()) == pytest.approx(total, rel=0.02) and sum(kinds.values()) < total
    assert f"- `ref`: convolution {kinds['convolution'] * 4 / 0.05:.0f}" in text


def test_attention_calls_from_a_meta_forward():
    from models.student import meta_unet, preset_spec, student_config
    from models.tiny import SD1_UNET

    teacher = dict(meta_unet(dict(SD1_UNET)).config)
    student = student_config(teacher, preset_spec("bk-small", teacher))
    t_calls, s_calls = sb.attention_calls(teacher, 16, 16), sb.attention_calls(student, 16, 16)
    heads = teacher["attention_head_dim"]
    assert all(shape[0] == heads for shape in t_calls)
    # self-attention over the 16 x 16 latent, cross-attention over the 77 text tokens, at the first level
    first = teacher["block_out_channels"][0] // heads
    assert t_calls[(heads, 256, 256, first)] > s_calls[(heads, 256, 256, first)] > 0
    assert t_calls[(heads, 256, 77, first)] == t_calls[(heads, 256, 256, first)]
    assert sum(t_calls.values()) > sum(s_calls.values())  # bk-small drops attention blocks and the mid block
    assert sb.time_call("math", (heads, 64, 77, first), 2, True, torch.device("cpu"), torch.float32, 1) > 0


def test_row_settings_follow_the_modifiers():
    from torch._inductor import config as inductor_config
    from torch.nn.attention import SDPBackend

    own = torch._C._get_sdp_priority_order()
    try:
        dt.apply_row_settings(dt.parse_levers("ddp+compile+cudnnb+sdpa-efficient+nhwcbwd")[0])
        assert torch.backends.cudnn.benchmark and inductor_config.force_layout_optimization
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        dt.apply_row_settings(dt.parse_levers("ddp+compile")[0])  # the next row starts from PyTorch's defaults
        assert not torch.backends.cudnn.benchmark and not inductor_config.force_layout_optimization
        assert torch._C._get_sdp_priority_order() == own
    finally:
        torch._C._set_sdp_priority_order(own)
        torch.backends.cudnn.benchmark = False
        inductor_config.force_layout_optimization = False


def test_fp8_levers_and_linear_calls_from_a_meta_forward():
    from bench import fp8_linear as fl
    from models.fp8 import fp8_linear_names
    from models.student import meta_unet
    from models.tiny import SD1_UNET

    assert [dt.fp8_mode(r) for r in dt.parse_levers("ddp+compile+fp8,ours+fp8s,ddp")] == ["both", "student", "off"]
    with pytest.raises(SystemExit, match="fp8 not a modifier of ref"):
        dt.parse_levers("ref+fp8")
    row = dt.parse_levers("ddp+compile+fp8")[0]
    sd15, sdxl = (argparse.Namespace(teacher=t, tiny=False) for t in ("sd15", "sdxl"))
    assert dt.estimate(row, [], sdxl) > 2 * dt.estimate(row, [], sd15)  # SDXL compiles for minutes longer
    teacher = dict(meta_unet(dict(SD1_UNET)).config)
    calls = fl.linear_calls(teacher, 16, 16, 2)
    # every switched layer runs once per forward: on the 2 x 16 x 16 latent tokens, or the 2 x 77 text tokens
    assert sum(calls.values()) == len(fp8_linear_names(meta_unet(teacher)))
    width = teacher["block_out_channels"][0]
    assert calls[(2 * 256, width, width)] > 0 and calls[(2 * 77, teacher["cross_attention_dim"], width)] > 0
    assert {tokens for tokens, _, _ in calls} <= {2 * 256, 2 * 64, 2 * 16, 2 * 4, 2 * 77}
    errors = fl.rel_errors((32, 32, 16), torch.device("cpu"), torch.float32)
    assert all(0 < e < 0.12 for e in errors)
    assert fl.rel_errors((21, 32, 16), torch.device("cpu"), torch.float32) == (0.0, 0.0, 0.0)  # falls back
