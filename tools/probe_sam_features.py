"""What a frozen SAM encoder's features say about the synthetic scenes: linear probes per cell.

    python tools/probe_sam_features.py                       # the demo's tiny random SAM
    python tools/probe_sam_features.py --position sincos     # the same with a 2-D sin-cos position embedding

SAM's mask decoder has no attention among image positions: a mask is a per-cell product of the
prompt's vector with the encoder's features (refined by attending to the prompt tokens only).
What a linear map cannot read from one cell's features, the decoder can hardly select by. This
renders synthetic scenes (:mod:`utils.data.synthetic`), runs the frozen image encoder, and fits on
two thirds of the cells (the rest held out):

* the colour and the kind of shape under each cell inside a shape (classification accuracy; the
  most frequent class alone is printed beside it),
* the cell's position in the image, x and y (R^2 of a ridge regression).
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.sam import SamTransform, build_sam  # noqa: E402
from utils.data.synthetic import COLOURS, SHAPE_KINDS, make_scene, render_scene  # noqa: E402

POSITIONS = ("zeros", "sincos")


def sincos_position_embedding(height: int, width: int, dim: int) -> torch.Tensor:
    """[1, height, width, dim] fixed 2-D sin-cos embedding (half the channels for y, half for x)."""

    def one_axis(n: int, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    y = one_axis(height, dim // 2)[:, None, :].expand(height, width, dim // 2)
    x = one_axis(width, dim // 2)[None, :, :].expand(height, width, dim // 2)
    return torch.cat([y, x], dim=-1).float()[None]


def cell_features(sam, num_scenes: int, seed: int) -> dict[str, torch.Tensor]:
    """Per embedding cell whose centre lies in the image: its features [N, C], the colour and kind
    index under its centre (-1 on the background), its centre's x and y in [0, 1]."""
    transform = SamTransform.from_sam(sam)
    patch = sam.image_encoder.patch_embed.proj.stride[0]  # pixels of SAM's input per embedding cell
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"features": [], "colour": [], "kind": [], "x": [], "y": []}
    for _ in range(num_scenes):
        scene = make_scene(rng)
        image = render_scene(scene)
        sam_input = transform.preprocess(image)
        with torch.no_grad():
            embedding = sam.image_encoder(transform.normalize(sam_input.pixel_values[None], [sam_input.input_size]))[0]
        label = np.full(image.shape[:2], -1)
        for index in range(len(scene.shapes)):
            label[scene.mask(index) > 0] = index
        scale = sam_input.input_size[0] / image.shape[0]
        for gy in range(math.ceil(sam_input.input_size[0] / patch)):
            for gx in range(math.ceil(sam_input.input_size[1] / patch)):
                y, x = int((gy + 0.5) * patch / scale), int((gx + 0.5) * patch / scale)
                if y >= image.shape[0] or x >= image.shape[1]:
                    continue
                shape = scene.shapes[label[y, x]] if label[y, x] >= 0 else None
                rows["features"].append(embedding[:, gy, gx])
                rows["colour"].append(list(COLOURS).index(shape.colour) if shape else -1)
                rows["kind"].append(SHAPE_KINDS.index(shape.kind) if shape else -1)
                rows["x"].append(x / image.shape[1])
                rows["y"].append(y / image.shape[0])
    return {"features": torch.stack(rows["features"]), **{k: torch.tensor(v) for k, v in rows.items() if k != "features"}}


def classification_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> tuple[float, float]:
    """(held-out accuracy of a linear classifier, share of the most frequent held-out class)."""
    inside = labels >= 0
    features, labels = features[inside], labels[inside]
    split = len(labels) * 2 // 3
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-2
    features = (features - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(features[:split]), labels[:split]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (linear(features[split:]).argmax(1) == labels[split:]).float().mean().item()
    majority = torch.bincount(labels[split:]).max().item() / len(labels[split:])
    return accuracy, majority


def regression_probe(features: torch.Tensor, target: torch.Tensor, ridge: float = 1.0) -> float:
    """Held-out R^2 of a ridge regression."""
    split = len(target) * 2 // 3
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-2
    design = torch.cat([(features - mean) / std, torch.ones(len(features), 1)], dim=1).double()
    train = design[:split]
    weights = torch.linalg.solve(train.T @ train + ridge * torch.eye(design.shape[1], dtype=torch.float64),
                                 train.T @ target[:split, None].double())
    predicted = (design[split:] @ weights)[:, 0]
    held_out = target[split:].double()
    return 1.0 - ((predicted - held_out) ** 2).mean().item() / held_out.var().item()


def probe(variant: str = "tiny", position: str = "zeros", num_scenes: int = 300, seed: int = 5) -> dict[str, float]:
    torch.manual_seed(0)
    sam = build_sam(variant)
    if position == "sincos":
        _, height, width, dim = sam.image_encoder.pos_embed.shape
        sam.image_encoder.pos_embed.data = sincos_position_embedding(height, width, dim)
    cells = cell_features(sam, num_scenes, seed)
    colour, colour_majority = classification_probe(cells["features"], cells["colour"])
    kind, kind_majority = classification_probe(cells["features"], cells["kind"])
    return {
        "colour_accuracy": colour, "colour_majority": colour_majority,
        "kind_accuracy": kind, "kind_majority": kind_majority,
        "x_r2": regression_probe(cells["features"], cells["x"]), "y_r2": regression_probe(cells["features"], cells["y"]),
        "cells": len(cells["colour"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", help="SAM variant, random weights (SAM's own initialisation)")
    parser.add_argument("--position", choices=POSITIONS, default="zeros",
                        help="the encoder's absolute position embedding: SAM's zeros, or a fixed 2-D sin-cos one")
    parser.add_argument("--num_scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = probe(args.variant, args.position, args.num_scenes, args.seed)
    print(f"SAM {args.variant}, position embedding {args.position}, {result['cells']} cells of {args.num_scenes} scenes:")
    print(f"  colour under the cell: {result['colour_accuracy']:.1%} (most frequent colour {result['colour_majority']:.1%})")
    print(f"  kind of shape under the cell: {result['kind_accuracy']:.1%} (most frequent kind {result['kind_majority']:.1%})")
    print(f"  position of the cell: R^2 {result['x_r2']:.2f} (x), {result['y_r2']:.2f} (y)")


if __name__ == "__main__":
    main()
