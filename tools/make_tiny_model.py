"""Write a tiny random segmenter directory (tiny Qwen-VL + tiny SAM) for tests and CPU demos.

    python tools/make_tiny_model.py --out work_dirs/tiny --family qwen2_5_vl

The directory loads like any other: ``--version DIR`` in train_ddp.py, test.py, inference.py.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.tiny import make_tiny_segmenter  # noqa: E402
from model.vlm import VLM_FAMILIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(VLM_FAMILIES))
    parser.add_argument("--hidden_size", type=int, default=64, help="text hidden size of the tiny VLM")
    parser.add_argument("--num_layers", type=int, default=2, help="text decoder layers of the tiny VLM")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_tiny_segmenter(
        args.out, args.family, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers
    )
    logging.info("wrote a tiny %s segmenter to %s", args.family, out)


if __name__ == "__main__":
    main()
