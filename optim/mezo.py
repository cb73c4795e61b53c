"""MeZO: zeroth-order SGD (SPSA) that needs no backward, no gradients and no optimizer state.

Each step draws a random direction z, measures the loss at theta + eps*z and at theta - eps*z, and moves along z
by the finite difference g = (loss+ - loss-) / (2 eps):

    theta <- theta - lr * (g * z + weight_decay * theta)

(with n samples, g*z is the mean of g_i * z_i over the samples). z is never stored: it is regenerated from a seed
keyed by (seed, step, sample, tensor name), so the order in which the engine streams blocks does not matter and
any tensor's z can be rebuilt where its weights are.

Perturbation here is exact: theta + eps*z is computed into a fresh tensor and theta itself is never touched
until the update. The MeZO paper's in-place "+eps z, -2 eps z, +eps z" does not restore theta exactly in
floating point (and drifts badly in bf16). Weight decay applies to tensors of two or more dimensions (matrices
and embeddings), not to biases and norm scales, as the MeZO reference does by name.

Storage: the weights may be stored in bfloat16 (`storage_dtype`) to halve what the disk holds and moves, while
the perturbed passes and the update math stay fp32: theta is upcast (exactly) to compute, and theta - lr*(...) is
rounded back to bf16 stochastically (rounding.py), with noise seeded like z, from (seed, step, tensor name).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .rounding import stochastic_round_to_bf16

__all__ = ["STORAGE_DTYPES", "InMemoryMeZO", "MeZO", "mezo_update"]

STORAGE_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes MeZO can store weights in (`MeZO.storage_dtype`)."""


@dataclass
class MeZO:
    """Zeroth-order SGD for `offload.Engine`: `Engine(model, optim.MeZO(lr=1e-6, eps=1e-3), budget)`.

    Args:
        lr: learning rate (MeZO's are small: 1e-7 to 1e-5 for fine-tuning).
        eps: perturbation scale.
        weight_decay: decoupled weight decay for tensors of two or more dimensions.
        samples: SPSA samples per step (n); each costs two forward passes of the batch.
        seed: base seed of every perturbation.
        storage_dtype: the dtype the trained weights are stored in: torch.float32, or torch.bfloat16 for half the
            bytes in every tier and on disk. Compute and the update stay fp32 either way. bf16 storage always
            rounds the updated weights stochastically: MeZO's steps (lr * g * z, often 1e-6 of a weight) are far
            below half a bf16 step, so round-to-nearest would put nearly every weight back where it was; stochastic
            rounding is unbiased, so the weights follow the fp32 trajectory in expectation.
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    samples: int = 1
    seed: int = 0
    storage_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        errors = []
        if self.lr < 0:
            errors.append(f"lr={self.lr} must be >= 0")
        if self.eps <= 0:
            errors.append(f"eps={self.eps} must be > 0")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.samples < 1:
            errors.append(f"samples={self.samples} must be >= 1")
        if self.storage_dtype not in STORAGE_DTYPES:
            errors.append(f"storage_dtype={self.storage_dtype} must be one of {STORAGE_DTYPES}")
        if errors:
            raise ValueError("MeZO: " + "; ".join(errors))

    def state_dict(self) -> dict:
        """MeZO keeps no state (z is regenerated from seeds); the engine flushes its pending update first."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"MeZO keeps no state, got keys {sorted(state)}")

    def direction(self, step: int, sample: int, name: str, like: torch.Tensor,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """z for tensor `name` at `step` and `sample`: standard normal, shaped and placed like `like` (in its dtype,
        or `dtype`)."""
        generator = self._generator(f"{step}/{sample}/{name}", like.device)
        return torch.randn(like.shape, generator=generator, dtype=dtype or like.dtype, device=like.device)

    def _generator(self, key: str, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, key) alone, so any tensor's noise is rebuilt wherever its weights are."""
        digest = hashlib.blake2b(f"{self.seed}/{key}".encode(), digest_size=8).digest()
        return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def perturbed(self, theta: torch.Tensor, z: torch.Tensor, sign: int) -> torch.Tensor:
        """theta + sign * eps * z, in a new tensor (theta is left exactly as it was)."""
        return theta + z * (sign * self.eps)

    def perturb_into(self, z: torch.Tensor, theta: torch.Tensor, sign: int) -> torch.Tensor:
        """`perturbed` computed in z's buffer, which is returned (z is consumed): the same two roundings, z * c
        then the sum (addition commutes bit for bit), without a second tensor of theta's size."""
        return z.mul_(sign * self.eps).add_(theta)

    def projected_gradient(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor) -> float:
        """g = (loss+ - loss-) / (2 eps), as MeZO computes it (fp32 difference, then a Python float)."""
        return float((loss_plus - loss_minus) / (2 * self.eps))  # host sync: g scales every update

    def update(self, stored: torch.Tensor, name: str, step: int, gradients: list[float]) -> None:
        """Apply step `step`'s update to tensor `name` in place; `gradients` holds g for each sample.

        `stored` is the tensor as stored (`storage_dtype`). The math is fp32 on theta upcast from it; bf16 storage
        takes the result back by stochastic rounding, its noise keyed by (seed, step, name) like z.

        Raises:
            TypeError: `stored` is not in `storage_dtype`.
        """
        if stored.dtype != self.storage_dtype:
            raise TypeError(f"MeZO(storage_dtype={self.storage_dtype}) was given {name} in {stored.dtype}")
        # `mezo_update`'s operations, element for element, with one tensor of the weights' size (z, then the mean of
        # g*z in its buffer) and the rest piece by piece: whole-tensor temporaries (theta upcast, g*z, lr*d, the
        # result, the rounding's noise) were several copies of an embedding, outside the engine's budget.
        direction = self.direction(step, 0, name, stored, torch.float32).mul_(gradients[0])
        for sample, g in enumerate(gradients[1:], start=1):
            direction.add_(self.direction(step, sample, name, stored, torch.float32).mul_(g))
        if len(gradients) > 1:
            direction.div_(len(gradients))
        decay = self.weight_decay if stored.dim() >= 2 else 0.0
        rounding = None if stored.dtype == torch.float32 else self._generator(f"{step}/round/{name}", stored.device)
        flat, moves = stored.view(-1), direction.view(-1)
        for start in range(0, flat.numel(), UPDATE_PIECE):
            piece = flat[start : start + UPDATE_PIECE]
            theta = piece.float()  # the piece itself when stored in fp32; an exact upcast from bf16
            move = moves[start : start + UPDATE_PIECE]
            if decay != 0:
                move = move + decay * theta
            updated = theta - self.lr * move
            piece.copy_(updated if rounding is None else stochastic_round_to_bf16(updated, rounding))


UPDATE_PIECE = 2**22
"""Elements `MeZO.update` takes at a time after z (16 MiB of fp32)."""


def mezo_update(
    theta: torch.Tensor, zs: list[torch.Tensor], gradients: list[float], *, lr: float, weight_decay: float
) -> torch.Tensor:
    """theta - lr * (mean_i(g_i * z_i) + weight_decay * theta), as a new tensor, in the MeZO reference's op order."""
    direction = zs[0] * gradients[0]
    for z, g in zip(zs[1:], gradients[1:]):
        direction = direction + z * g
    if len(zs) > 1:
        direction = direction / len(zs)
    if weight_decay != 0:
        direction = direction + weight_decay * theta
    return theta - lr * direction


class InMemoryMeZO(torch.optim.Optimizer):
    """MeZO as a `torch.optim.Optimizer`, for a model that fits in memory: the same math and seeds as the engine's
    streamed MeZO, so the two follow one trajectory.

    `step(closure)` needs the closure: it returns the loss of the model's current parameters (no backward; called
    twice per sample with the parameters perturbed).

    With `mezo.storage_dtype=torch.bfloat16` the parameters stay fp32 tensors (they compute in fp32, as the
    engine's do) but hold bf16 values: rounded to nearest here, as the engine rounds weights when it loads them, and
    stochastically after each update. Each step takes the bf16 weights from the parameters (exactly) and gives
    them back upcast, so the optimizer keeps no copy of its own.

    Args:
        named_parameters: `model.named_parameters()`; the names key the perturbations, as the engine's do.
        mezo: the hyperparameters; `lr` may be changed through `param_groups[0]["lr"]` (LR schedulers).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], mezo: MeZO) -> None:
        self._named = list(named_parameters)
        super().__init__([p for _, p in self._named], {"lr": mezo.lr, "step": 0})
        self.mezo = mezo
        if mezo.storage_dtype != torch.float32:
            for _, p in self._named:
                p.data = p.data.to(mezo.storage_dtype).float()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("InMemoryMeZO.step needs a closure that returns the loss (MeZO measures, it has no grad)")
        group = self.param_groups[0]
        group["step"] += 1
        self.mezo.lr = group["lr"]
        # As stored (fp32: the parameter's own tensor; bf16: exact, its values are bf16 already), and upcast to
        # compute (fp32: the same tensor again).
        stored = {name: p.data.to(self.mezo.storage_dtype) for name, p in self._named}
        theta = {name: value.float() for name, value in stored.items()}
        losses = []
        for sample in range(self.mezo.samples):
            for sign in (1, -1):
                for name, p in self._named:
                    z = self.mezo.direction(group["step"], sample, name, theta[name])
                    p.data = self.mezo.perturbed(theta[name], z, sign)
                losses.append(closure())
        gradients = [self.mezo.projected_gradient(losses[2 * i], losses[2 * i + 1]) for i in range(self.mezo.samples)]
        for name, p in self._named:
            self.mezo.update(stored[name], name, group["step"], gradients)
            p.data = stored[name].float()
        return torch.stack(losses).mean()
