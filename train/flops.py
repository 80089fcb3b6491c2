"""FLOPs of a training step, counted on the real step, and MFU against the card's dense bf16 peak.

One definition, used by ``abvid bench train`` and ``tools/gpu_check.sh``:

    MFU = counted FLOPs per step / step time / peak dense bf16 FLOP/s of the card

* **counted FLOPs per step**: ``torch.utils.flop_counter.FlopCounterMode`` around one real
  ``objective.loss(batch)`` + ``loss.backward()`` (:func:`step_flops`): the student's forward
  and backward, the teacher's forward, the heads, the value decoder and the losses. It counts
  matrix multiplies, convolutions and attention (2 FLOPs per multiply-add); elementwise work,
  norms, the optimizer and the EMA are not counted, and neither is activation-checkpointing
  recompute (the count is of the model, not of the hardware's work). Attention's backward is
  counted as FlopCounterMode does, with the recompute of the scores that flash attention does.
  The count does not depend on ``torch.compile`` or the device.
* **peak**: the dense (no 2:4 sparsity) bf16 tensor-core rate of the card's datasheet
  (:data:`PEAK_BF16_TFLOPS`); an unknown card has no MFU (``--peak-tflops`` / ``PEAK_TFLOPS``
  supply one). CPU runs have no MFU.

FlopCounterMode has no formula for the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` runs on CPU; :data:`CUSTOM_FORMULAS` adds it (the CUDA
kernels are registered in torch), so a CPU count equals a CUDA count.

Closed form of a ViT forward (:func:`vit_forward_flops`; tests/test_flops.py holds the count to
it within 2%): per image with N patches, T = N + 1 tokens, width D, MLP ratio r, depth L,
patch p: ``2 N D 3 p^2 + L ((8 + 4 r) T D^2 + 4 T^2 D)``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name pattern, most specific first,
# with the source of each number. torch.cuda.get_device_name() gives e.g. "NVIDIA H100 80GB HBM3"
# (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090".
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*NVL", 835.0, "NVIDIA H100 datasheet, H100 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity, /2"),
    (r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity, /2"),
    (r"H200.*NVL", 835.0, "NVIDIA H200 datasheet, H200 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity, /2"),
    (r"H100|H200|GH200|H800", 989.0,
     "NVIDIA H100 / H200 datasheets, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, /2 (989.4)"),
    (r"A100|A800", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)"),
    (r"L40S", 362.0, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity, /2"),
    (r"\bA10G?\b", 125.0, "NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS dense (250 with sparsity)"),
    (r"RTX 4090", 165.2, "NVIDIA Ada (AD102) whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate "
                         "165.2 TFLOPS dense"),
)


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CUSTOM_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    CUSTOM_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention that ``fn()`` runs."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(objective: nn.Module, batch: dict, teacher_temp: float | None = None,
               autocast: Callable[[], Any] = contextlib.nullcontext) -> int:
    """FLOPs of one training step's forward and backward: ``objective.loss(batch)`` + ``backward()``.

    Runs the real objective once (its gradients are cleared afterwards; BatchNorm running statistics
    move as in any step). Optimizer and EMA updates are elementwise and not counted.
    """
    def run() -> None:
        with autocast():
            loss, _ = objective.loss(batch, teacher_temp=teacher_temp)
        loss.backward()

    flops = count_flops(run)
    objective.zero_grad(set_to_none=True)
    return flops


def vit_forward_flops(images: int, height: int, width: int, patch: int, dim: int, depth: int,
                      mlp_ratio: float = 4.0) -> int:
    """Closed-form forward FLOPs of ``images`` ViT images (model/vit.py, no classifier): see the docstring."""
    n = (height // patch) * (width // patch)
    t = n + 1
    per_image = 2 * n * dim * 3 * patch * patch + depth * ((8 + 4 * mlp_ratio) * t * dim * dim + 4 * t * t * dim)
    return int(images * per_image)


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, source) for a CUDA device name; (None, why) for a card not in the table."""
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, source
    return None, (f"no peak for '{device_name}' in abvid.train.flops.PEAK_BF16_TFLOPS: MFU omitted "
                  "(pass --peak-tflops, or PEAK_TFLOPS=... to tools/gpu_check.sh)")


def mfu(flops_per_step: float, step_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation (see the module docstring); None without a peak or a step time."""
    if not peak_tflops or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tflops * 1e12)


def device_peak(device: torch.device | str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """Peak and its source for ``device``: the override when given, the table on CUDA, none on CPU."""
    device = torch.device(device)
    if override_tflops:
        return float(override_tflops), "given (--peak-tflops / PEAK_TFLOPS)"
    if device.type != "cuda":
        return None, "no MFU on CPU (no bf16 tensor-core peak to compare with)"
    return peak_bf16_tflops(torch.cuda.get_device_name(device))
