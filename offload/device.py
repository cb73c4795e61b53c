"""Moving chunk bytes between the host and the compute device.

On CPU the two tiers are the same RAM, so a move is bookkeeping only. On CUDA host buffers are pinned (so
copies are real DMA and can overlap compute), every copy runs on one side stream, and each copy records an
event that the consumer waits on: the compute stream waits on the GPU (no host sync), the CPU optimizer waits
on the host for exactly that copy. Nothing here calls torch.cuda.synchronize().
"""

from __future__ import annotations

import torch

from .host_memory import aligned_empty

__all__ = ["Transport", "default_compute_dtype", "make_transport"]


class Transport:
    """CPU transport: device and host are one memory, so moving a chunk moves only its accounting."""

    shares_memory = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocate(self, nbytes: int, *, on_device: bool) -> torch.Tensor:
        """A raw uint8 buffer, 4096-byte aligned (so O_DIRECT can read into it)."""
        return aligned_empty(nbytes)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> object | None:
        """Start `dst.copy_(src)`; returns what `ready` and `ready_on_host` take (None: done already)."""
        dst.copy_(src)
        return None

    def ready(self, token: object | None) -> None:
        """Order the compute stream after a copy (CPU: nothing in flight)."""

    def ready_on_host(self, token: object | None) -> None:
        """Block the calling CPU thread until a copy is done (CPU: nothing in flight)."""


class CudaTransport(Transport):
    """Pinned host buffers, one copy stream, one event per copy."""

    shares_memory = False

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.copy_stream = torch.cuda.Stream(device)

    def allocate(self, nbytes: int, *, on_device: bool) -> torch.Tensor:
        if not on_device:
            return aligned_empty(nbytes, pin_memory=True)
        # Allocated on the copy stream, the stream that first writes it; consumers on the compute stream call
        # record_stream (in ready) so the caching allocator will not hand it out while they still read it.
        with torch.cuda.stream(self.copy_stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> object:
        # The copy stream first waits for work already queued on the compute stream, so a device->host copy of
        # gradients sees the finished backward and a host->device copy never overtakes a reader of `dst`.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return (event, dst)

    def ready(self, token: object | None) -> None:
        if token is None:
            return
        event, dst = token
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)  # GPU-side wait: the compute stream orders itself after the copy
        if dst.is_cuda:
            dst.record_stream(stream)

    def ready_on_host(self, token: object | None) -> None:
        if token is not None:
            token[0].synchronize()  # host sync on this one copy only, before the CPU reads its bytes


def make_transport(device: torch.device) -> Transport:
    """The transport for `device`; anything but CUDA computes in host RAM."""
    return CudaTransport(device) if device.type == "cuda" else Transport(device)


def default_compute_dtype(device: torch.device, *, zeroth_order: bool) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere: bf16 matrix products are far slower than fp32 on most CPUs. Zeroth-order
    training (MeZO) perturbs and updates the weights themselves, whose tiny steps bf16 would round away: fp32."""
    return torch.bfloat16 if device.type == "cuda" and not zeroth_order else torch.float32
