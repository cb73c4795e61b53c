"""AdamW on flat chunks, the same arithmetic as torch.optim.AdamW (single-tensor path) op for op.

Matching op for op (lerp for the first moment, mul+addcmul for the second, the same bias-correction order) is
what makes the engine's result equal in-memory training to the last bit, not just to a tolerance.
"""

from __future__ import annotations

import torch

from .base import ChunkOptimizer, StateSpec
from .layout import ChunkLayout

__all__ = ["AdamW", "adamw_update"]

# Elements per slice of a flat update. A slice's four operands and two temporaries (1 MiB each in fp32) stay in the
# cores' caches between the update's seven passes, and the temporaries stay below the heap's mmap threshold
# (heap.MMAP_THRESHOLD, 4 MiB), so they are not page-faulted in anew for every slice. Measured on the CI VM (2 cores,
# 2 MiB of L2 each), a 7M-element update from memory not in cache: 18.8 ms with 2**18 on two threads, 29.6 ms with
# 2**20 (4 MiB temporaries); on one thread (the optimizer worker's: offload/helper_threads.py) 36.6 and 40.4 ms.
# Below 2**15, torch's grain, a slice runs on one thread.
_SLICE = 1 << 18


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One decoupled-weight-decay Adam update in fp32, in place; all tensors have one shape.

    Flat tensors are updated a slice at a time: the update is elementwise, so slicing changes no result, and
    the two temporaries it needs stay slice-sized instead of block-sized (memory the budget does not count).
    """
    if param.dim() == 1 and param.numel() > _SLICE:
        for start in range(0, param.numel(), _SLICE):
            piece = slice(start, start + _SLICE)
            adamw_update(
                param[piece], grad[piece], exp_avg[piece], exp_avg_sq[piece], step=step, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay,
            )
        return
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(ChunkOptimizer):
    """AdamW with fp32 moments (8 bytes of state per parameter).

    Args mirror torch.optim.AdamW; the defaults are torch's.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        errors = []
        if lr < 0:
            errors.append(f"lr={lr} must be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            errors.append(f"betas={betas} must each be in [0, 1)")
        if eps < 0:
            errors.append(f"eps={eps} must be >= 0")
        if weight_decay < 0:
            errors.append(f"weight_decay={weight_decay} must be >= 0")
        if errors:
            raise ValueError("AdamW: " + "; ".join(errors))
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def state_specs(self, layout: ChunkLayout) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(layout.numel, torch.float32), "exp_avg_sq": StateSpec(layout.numel, torch.float32)}

    def step(
        self,
        params: torch.Tensor,
        grads: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        step: int,
        layout: ChunkLayout,
    ) -> None:
        adamw_update(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=step,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            eps=self.eps,
            weight_decay=self.weight_decay,
        )

    def __repr__(self) -> str:
        return f"AdamW(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})"
