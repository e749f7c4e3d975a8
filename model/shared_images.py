"""One vision-tower run per distinct image in a batch whose rows share images.

A training sample asks several questions about one image (LISA's 3 per image); each question is a
row of the batch, and Qwen-VL expects one image per row. :func:`shared_images` makes the tower run
on each distinct image once and repeats its output row by row.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .batch import row_images, shares_images, vlm_inputs
from .image_cache import find_vision_tower


def _split_rows(value: Any, sizes: list[int], image_index: list[int]) -> Any:
    """Per-image rows of ``value`` (concatenated in image order) repeated in ``image_index`` order."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == sum(sizes):
        parts = torch.split(value, sizes)
        return torch.cat([parts[i] for i in image_index])
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split_rows(v, sizes, image_index) for v in value)
    return value


def _expand_vision_output(output: Any, grid_thw: torch.Tensor, merge_size: int, image_index: list[int]) -> Any:
    """A vision-tower output for the unique images -> the output for one image per row.

    Merged features (``pooler_output``, Qwen3-VL's ``deepstack_features``) have
    ``t*h*w / merge_size**2`` rows per image, patch features (``last_hidden_state``) ``t*h*w``.
    """
    patches = grid_thw.prod(-1).tolist()
    merged = [count // merge_size**2 for count in patches]
    from transformers.utils import ModelOutput

    if isinstance(output, ModelOutput):
        fields = {}
        for key, value in output.items():
            sizes = patches if key == "last_hidden_state" else merged
            fields[key] = _split_rows(value, sizes, image_index)
        return type(output)(**fields)
    if isinstance(output, torch.Tensor):  # an older vision tower returning the merged features
        return _split_rows(output, merged, image_index)
    raise TypeError(f"unexpected vision-tower output {type(output).__name__}")


@contextmanager
def shared_images(vlm: nn.Module, batch: dict) -> Iterator[dict]:
    """The Qwen-VL inputs of a batch whose rows (conversations) may share images.

    A batch from :func:`model.batch.collate` holds each image once (``pixel_values``,
    ``image_grid_thw``) and maps rows to images with ``image_index``. Qwen-VL expects one image per
    image placeholder, i.e. per row. Inside this context the VLM is given the per-row grids (for
    its rotary positions) with the unique images' patches, and hooks on its vision tower make that
    tower run once on the unique images; its output is then repeated row by row, so the language
    model sees exactly the features it would see with every row carrying its own copy of the image.
    Without shared images the inputs are passed as they are and nothing is hooked. Gradients flow
    through the repeat (the vision tower itself is frozen).

    Yields:
        the keyword arguments for the VLM (without ``labels``).
    """
    inputs = vlm_inputs(batch)
    if batch.get("image_grid_thw") is None or not shares_images(batch):
        yield inputs
        return
    image_index = row_images(batch)
    unique_grid = batch["image_grid_thw"]
    row_grid = unique_grid[torch.as_tensor(image_index, device=unique_grid.device)]
    inputs["image_grid_thw"] = row_grid
    visual = find_vision_tower(vlm)
    merge_size = int(getattr(visual, "spatial_merge_size", None) or getattr(visual.config, "spatial_merge_size", 2))
    active = {"call": False}

    def before(_module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        active["call"] = isinstance(grid, torch.Tensor) and grid.shape == row_grid.shape and torch.equal(grid, row_grid)
        if not active["call"]:
            return None
        if "grid_thw" in kwargs:
            kwargs = {**kwargs, "grid_thw": unique_grid}
        else:
            args = (args[0], unique_grid, *args[2:])
        return args, kwargs

    def after(_module, _args, output):
        if not active["call"]:
            return None
        active["call"] = False
        return _expand_vision_output(output, unique_grid, merge_size, image_index)

    handles = [
        visual.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        visual.register_forward_hook(after, prepend=True),
    ]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()
