#!/usr/bin/env python
"""Write what the data layer reads from a dataset, to check it by eye and by script.

For each sample it writes the image with each mask drawn over it (green target, red ignore),
each mask as a single-channel PNG (values 0/1/255 kept), and one line of ``OUT/samples.jsonl``
with ``image`` (source image path), ``requests``, ``questions``, ``answers``, ``answer`` (the
answers joined by newlines), ``masks`` (PNG paths, one per ``[SEG]`` in order), ``overlays``
and a few meta fields.

Examples::

    python tools/inspect_data.py --dataset_dir dataset --dataset reason_seg --split "ReasonSeg|val" --out /tmp/i
    python tools/inspect_data.py --dataset_dir dataset --dataset refer_seg --split "refcoco|unc|val" --out /tmp/i
    python tools/inspect_data.py --dataset_dir dataset --dataset sem_seg --split ade20k --mode train --out /tmp/i
    python tools/inspect_data.py --dataset_dir dataset --dataset vqa --split llava_instruct_150k --out /tmp/i
    python tools/inspect_data.py --dataset_dir dataset --dataset coco --split "mine/ann.json|mine/images" --out /tmp/i
    python tools/inspect_data.py --dataset_dir synthetic_root --dataset "synthetic|val" --num 16 --out /tmp/i
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.constants import ANSWER_STYLES  # noqa: E402
from utils.data.base import RawDataset  # noqa: E402
from utils.data.builders import SOURCE_KINDS, build_source_dataset, build_val_dataset  # noqa: E402
from utils.data.rng import derive_rng  # noqa: E402
from utils.data.sample import CorruptSampleError, RawSample  # noqa: E402
from utils.data.visualize import overlay_mask  # noqa: E402

logger = logging.getLogger("inspect_data")

DEFAULT_SPLITS: dict[str, str] = {
    "reason_seg": "ReasonSeg|val",
    "refer_seg": "refcoco|unc|val",
    "sem_seg": "ade20k",
    "vqa": "llava_instruct_150k",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset root")
    parser.add_argument("--dataset", required=True,
                        help=f"source kind ({', '.join(SOURCE_KINDS)}) or a validation name such as 'synthetic|val'")
    parser.add_argument("--split", default=None, help="spec of the source, e.g. 'refcoco|unc|val', 'ade20k'")
    parser.add_argument("--mode", choices=("val", "train"), default="val",
                        help="val: fixed items and canonical templates; train: random questions")
    parser.add_argument("--num", type=int, default=8, help="number of samples to write")
    parser.add_argument("--start", type=int, default=0, help="first item index")
    parser.add_argument("--seed", type=int, default=0, help="seed of train-mode draws")
    parser.add_argument("--answer_style", choices=ANSWER_STYLES, default="plain",
                        help="how mask answers are worded (train_ddp.py --answer_style)")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def open_dataset(args: argparse.Namespace) -> RawDataset:
    """The dataset named by ``--dataset`` / ``--split`` / ``--mode``."""
    if args.dataset not in SOURCE_KINDS:
        return build_val_dataset(args.dataset, args.dataset_dir, answer_style=args.answer_style)
    spec = args.split or DEFAULT_SPLITS.get(args.dataset)
    if spec is None:
        raise SystemExit(f"--dataset {args.dataset} needs --split")
    return build_source_dataset(args.dataset, spec, args.dataset_dir, args.mode, args.seed,
                                answer_style=args.answer_style)


def write_sample(sample: RawSample, number: int, index: int, out_dir: str) -> dict[str, object]:
    """Write the overlays and masks of one sample; return its JSONL record."""
    stem = os.path.join(out_dir, f"{number:05d}")
    mask_paths, overlay_paths = [], []
    for position, mask in enumerate(sample.masks):
        mask_path = f"{stem}_mask_{position}.png"
        Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(mask_path)  # 2-D uint8: mode "L"
        overlay_path = f"{stem}_overlay_{position}.jpg"
        Image.fromarray(overlay_mask(sample.image, mask)).save(overlay_path, quality=90)
        mask_paths.append(mask_path)
        overlay_paths.append(overlay_path)
    if not sample.masks:
        overlay_path = f"{stem}_image.jpg"
        Image.fromarray(sample.image).save(overlay_path, quality=90)
        overlay_paths.append(overlay_path)
    answers = [answer for _, answer in sample.turns]
    return {
        "index": index,
        "dataset": sample.dataset,
        "image": sample.image_path,
        "image_size": list(sample.image.shape[:2]),
        "requests": sample.requests,
        "questions": [question for question, _ in sample.turns],
        "answers": answers,
        "answer": "\n".join(answers),
        "masks": mask_paths,
        "overlays": overlay_paths,
        "mask_values": [sorted(int(v) for v in np.unique(mask)) for mask in sample.masks],
        "no_target": sample.meta.get("no_target"),
        "is_sentence": sample.meta.get("is_sentence"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dataset = open_dataset(args)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    indices = range(args.start, len(dataset))
    jsonl_path = os.path.join(out_dir, "samples.jsonl")
    with open(jsonl_path, "w", encoding="utf-8") as jsonl, tqdm(total=args.num, desc="samples") as bar:
        for index in indices:
            if written >= args.num:
                break
            try:
                sample = dataset.get_sample(index, derive_rng(args.seed, index))
            except CorruptSampleError as error:
                logger.warning("item %d skipped: %s", index, error)
                continue
            jsonl.write(json.dumps(write_sample(sample, written, index, out_dir)) + "\n")
            written += 1
            bar.update(1)
    logger.info("wrote %d samples of %r to %s", written, dataset, out_dir)


if __name__ == "__main__":
    main()
