"""Peak training memory and compute of one method, in parts, from sizes alone (no weights, no data).

weights + gradients + AdamW state + activations (+ logits for language models) + the runtime's own overhead
on this device. Activations follow the structure the method leaves (see structure.py); with gradient
checkpointing only each block's input is kept, plus one block's worth while it is recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .structure import MethodFootprint, Shape

MB = 2**20
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32


@dataclass
class Workload:
    batch_size: int
    seq_len: int           # the longest batch decides the peak: data.max_length
    precision: str         # "bf16" (autocast) or "fp32"
    logits_per_token: int  # output width whose logits are materialised per token (vocabulary for LMs)
    adapter_bf16_weights: bool  # the method keeps frozen matmul weights in bf16 under bf16


def memory_parts(shape: Shape, fp: MethodFootprint, work: Workload, overhead_mb: float,
                 checkpointing: bool = False) -> dict[str, float]:
    """Megabytes per part, and their total as `peak_memory_mb`."""
    element = 2 if work.precision == "bf16" else 4
    weights = 4 * (shape.total_params + fp.added_params)
    if work.precision == "bf16" and work.adapter_bf16_weights:
        weights -= 2 * fp.frozen_matmul_params
    tokens = work.batch_size * (work.seq_len + fp.virtual_tokens)
    per_block = fp.saved_elements_per_token / max(fp.blocks_with_grad, 1)
    if checkpointing and fp.blocks_with_grad:
        activations = tokens * (fp.blocks_with_grad * shape.hidden + per_block) * element
    else:
        activations = tokens * fp.saved_elements_per_token * element
    # in fp32: the logits, their log-softmax and its gradient; under bf16 also the bf16 logits the head emits
    # (kept in the model's output) and the gradient cast back to bf16 for the head's backward: 4 fp32-sized
    # copies (measured on SmolLM2: a LoRA step's transient was 1.7 GB over its activations, 3 copies are 1.15 GB)
    copies_bytes = 4 * 3 + (2 * 2 if work.precision == "bf16" else 0)
    logits = work.batch_size * work.seq_len * work.logits_per_token * copies_bytes
    parts = {"weights_mb": weights, "gradients_mb": 4 * fp.trainable_params,
             "optimizer_mb": 4 * ADAM_STATES * fp.trainable_params, "activations_mb": activations,
             "logits_mb": logits}
    parts = {k: v / MB for k, v in parts.items()}
    parts["runtime_overhead_mb"] = overhead_mb
    parts["peak_memory_mb"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def train_flops_per_token(shape: Shape, fp: MethodFootprint, matmul_params: int, trainable_matmul: int,
                          grad_path_matmul: int, seq_len: int) -> float:
    """Forward 2 FLOPs per matmul weight; backward 2 more where the gradient passes through a block and 2
    more per trainable weight (its own gradient); attention products 4·s·h per layer forward, twice that
    backward in the blocks the gradient passes."""
    attention = 4 * seq_len * shape.hidden
    return (2 * matmul_params + 2 * grad_path_matmul + 2 * trainable_matmul
            + attention * (shape.layers + 2 * fp.blocks_with_grad))
