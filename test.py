"""Score the reasoning segmenter on benchmark splits, as the published tables do.

    python test.py --version MODEL_DIR --dataset_dir dataset --val_dataset "ReasonSeg|val"
    python test.py --version runs/exp/checkpoint-0005000 --base_model BASE_QWEN_VL --vision_pretrained SAM.pth \\
        --val_dataset "ReasonSeg|test||refcoco|unc|testA||grefcoco|unc|val" --protocol both
    torchrun --nproc_per_node=8 test.py ...      (each split sharded over ranks, reduced exactly)

Prints a table (protocol, split, counts, gIoU, cIoU, precision@0.5-0.9, box IoU, Acc@0.5, N-acc,
T-acc, share of answers with the expected [SEG]) and writes a JSON report (--report, default
runs/test/report.json); --save_predictions FILE.jsonl keeps every mask as COCO RLE. Under
--protocol generate a second table scores every answer's boxes as detections (precision, recall
and F1 at IoU 0.5), and a COCO-format split ("coco|instances.json|image_dir") gets COCO box and
mask AP from pycocotools on the detections it writes (--save_detections). See
`python test.py --help`; the work is in utils/eval_cli.py, utils/evaluation.py, utils/metrics.py.
"""

import sys
from functools import partial

from utils.cli import setup_environment

setup_environment()

from utils.eval_args import parse_args  # noqa: E402

if __name__ == "__main__":
    args = parse_args()  # before the evaluation code imports torch: --help and a wrong flag answer at once
    from utils.eval_cli import main

    sys.exit(main(say=partial(print, flush=True), args=args))
