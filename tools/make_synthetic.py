#!/usr/bin/env python
"""Write a synthetic dataset root (coloured shapes) in the real on-disk formats.

Example::

    python tools/make_synthetic.py --out dataset/synthetic --seed 0 --num_train 500 --num_val 100

The root can then be passed as ``--dataset_dir`` to training with the flags printed at the end
(also stored in ``<out>/synthetic.json``). See ``dataset/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.data.synthetic_writer import write_synthetic_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to create")
    parser.add_argument("--seed", type=int, default=0, help="the output is a pure function of the seed and counts")
    parser.add_argument("--num_train", type=int, default=500, help="training scenes")
    parser.add_argument("--num_val", type=int, default=100, help="held-out validation scenes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic root at --out")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    marker = write_synthetic_dataset(
        args.out, args.seed, args.num_train, args.num_val, overwrite=args.overwrite, show_progress=not args.no_progress
    )
    flags = " ".join(f'--{key} "{value}"' for key, value in marker["train_flags"].items())
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num_train} train + {args.num_val} val scenes to {args.out} in {elapsed:.1f}s")
    print(f"train with: --dataset_dir {args.out} {flags}")


if __name__ == "__main__":
    main()
