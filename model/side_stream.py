"""Work started on a side CUDA stream, beside what the current stream runs next.

A request's prefill is bound by the host on a GPU (the Qwen-VL forward over a 640x480 image's
prompt launches 2,922 kernels: 55-72 ms of wall time for 29 ms of kernels on an H200, profiled
2026-11-30), so the GPU idles much of that time; SAM's image encoder (about 30 ms of kernels) has
no dependence on the language model. :class:`SideStream` starts such work on a second
stream and hands the result over to the current stream when it is needed. On a CPU the work simply
runs at once.
"""

from __future__ import annotations

from typing import Callable

import torch


class SideStream:
    """One side stream per CUDA device, created on first use."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def start(self, work: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
        """Run ``work`` (its inputs ready on the current stream) beside the current stream;
        returns a function that gives its result, safe to use on the current stream."""
        device = torch.device(device)
        if device.type != "cuda":
            result = work()
            return lambda: result
        main = torch.cuda.current_stream(device)
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        side.wait_stream(main)  # the inputs were written on the current stream
        with torch.cuda.stream(side):
            result = work()

        def ready() -> torch.Tensor:
            main.wait_stream(side)
            # Allocated on the side stream: the allocator must not reuse its memory while the
            # current stream still reads it.
            result.record_stream(main)
            return result

        return ready
