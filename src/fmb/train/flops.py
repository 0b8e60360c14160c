"""FLOPs of a training step, counted by torch's FlopCounterMode with attention counted on every device.

torch 2.13's counter has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN)
but none for the CPU one, `aten._scaled_dot_product_flash_attention_for_cpu` (and its backward),
which `F.scaled_dot_product_attention` calls on CPU: there attention went uncounted. Its formulas
also count causal attention as if nothing were masked, where the kernels skip the masked half.
`flop_counter()` maps all of them to one formula: torch's own counts of the products, scaled by
the fraction of (query, key) pairs that a causal mask keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# SDPA kernels: forward and backward op names (the backward's first argument is the output gradient).
ATTENTION_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def causal_fraction(queries: int, keys: int) -> float:
    """Share of (query, key) pairs kept by torch's `is_causal` mask (lower triangle from the top left)."""
    if queries <= keys:
        kept = queries * (queries + 1) // 2
    else:
        kept = keys * (keys + 1) // 2 + (queries - keys) * keys
    return kept / (queries * keys)


def _attention_formula(op: torch._ops.OpOverloadPacket, backward: bool) -> Callable[..., int]:
    causal_at = [argument.name for argument in op.default._schema.arguments].index("is_causal")

    def formula(*args, out_shape=None, **kwargs) -> int:  # tensors arrive as shapes
        causal = kwargs.get("is_causal", args[causal_at] if len(args) > causal_at else False)
        if backward:
            flops = sdpa_backward_flop_count(*args[:4])
        else:
            flops = sdpa_flop_count(*args[:3])
        query, key = args[1:3] if backward else args[:2]
        return round(flops * causal_fraction(query[-2], key[-2])) if causal else flops

    return formula


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode (display off) that also counts attention on CPU and halves causal attention."""
    mapping = {}
    for name in ATTENTION_KERNELS:
        for op_name, backward in ((name, False), (f"{name}_backward", True)):
            op = getattr(torch.ops.aten, op_name, None)
            if op is not None:
                mapping[op] = _attention_formula(op, backward)
    return FlopCounterMode(display=False, custom_mapping=mapping)
