"""The built-in default, end to end on this machine: `make demo`.

Builds a tiny random segmenter and answers a request about a real photograph, writing the mask
and overlay. (It grows into synthetic data -> training -> evaluation -> merge -> inference as
those parts land.)
"""

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from model.segmenter import ReasonSegmenter  # noqa: E402
from model.tiny import make_tiny_segmenter  # noqa: E402
from utils.masks import overlay_masks  # noqa: E402

logger = logging.getLogger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--image", default=str(REPO / "tools" / "examples" / "car_speed.jpg"))
    parser.add_argument("--prompt", default="Where can the driver see the car speed in this image? Please output segmentation mask.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    model_dir = make_tiny_segmenter(out / "tiny_model")
    model = ReasonSegmenter.from_pretrained(model_dir).eval()
    image = np.array(Image.open(args.image).convert("RGB"))
    [result] = model.predict([image], [args.prompt], max_new_tokens=16)
    Image.fromarray(overlay_masks(image, result.masks)).save(out / "overlay.png")
    logger.info("answer: %r (%d masks, boxes %s); overlay in %s", result.text, len(result.masks), result.boxes, out / "overlay.png")


if __name__ == "__main__":
    main()
