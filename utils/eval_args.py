"""Command-line arguments of test.py, checked before anything heavy loads: ``--help`` and a wrong
flag answer at once (torch alone takes seconds to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.constants import EVAL_PROTOCOLS, TEACHER_FORCED
from utils.cli import add_model_arguments, check_pixel_arguments
from utils.dataset_names import split_names, val_split_kind

DEFAULT_LOG_DIR = "./runs/test"
REPORT_NAME = "report.json"
TABLE_NAME = "results.txt"
DETECTIONS_NAME = "detections.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test.py",
        description="Score a reasoning segmenter on benchmark splits (gIoU, cIoU, precision@IoU, mask-derived "
        "boxes, N-acc), teacher-forced and/or generated; python test.py or torchrun ... test.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p, auto_decoding="compiled on CUDA, else eager. Only --protocol generate decodes")
    data = p.add_argument_group("data")
    data.add_argument("--val_dataset", default="ReasonSeg|val",
                      help="one or several splits joined by '||': ReasonSeg|val, ReasonSeg|test, refcoco|unc|val, "
                      "refcoco|unc|testA, refcoco+|unc|testB, refcocog|umd|test, grefcoco|unc|val, synthetic|val, "
                      "synthetic|refer_val, synthetic|grefer_val; your own COCO-format file: coco|instances.json|image_dir "
                      "(every category asked about every image, one [SEG] per instance, COCO AP under generate; "
                      "add |present to ask only the categories an image has) ...")
    data.add_argument("--dataset_dir", default="./dataset")
    data.add_argument("--reason_seg_queries", choices=["first", "all"], default="first",
                      help="ReasonSeg: score the first query of each image (LISA's published protocol) or every query")
    data.add_argument("--max_samples", type=int, default=0,
                      help="score only the first N items of each split (quick runs; marked partial; 0: all)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    run = p.add_argument_group("evaluation")
    run.add_argument("--protocol", choices=[*EVAL_PROTOCOLS, "both"], default=TEACHER_FORCED,
                     help="teacher_forced: the answer with [SEG] is given (published numbers); generate: the model answers")
    run.add_argument("--batch_size", type=int, default=1, help="per process")
    run.add_argument("--max_new_tokens", type=int, default=64, help="generate: answer length limit")
    out = p.add_argument_group("output")
    out.add_argument("--log_dir", default=DEFAULT_LOG_DIR,
                     help=f"where {REPORT_NAME} and {TABLE_NAME} go ({TABLE_NAME} goes beside --report when that is given)")
    out.add_argument("--report", help=f"JSON report path (default: LOG_DIR/{REPORT_NAME})")
    out.add_argument("--save_predictions", help="JSONL of every prediction (COCO RLE masks, boxes, answers, targets)")
    out.add_argument("--save_detections",
                     help="COCO-format splits under generate: the detections file (COCO results format: image_id, "
                     "category_id, bbox [x, y, w, h], score, segmentation RLE; re-score it with pycocotools alone) "
                     f"that COCO AP is computed from (default: LOG_DIR/{DETECTIONS_NAME}; several COCO splits: "
                     "NAME_1.json, NAME_2.json ... in --val_dataset order)")
    out.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_samples < 0 or args.workers < 0:
        parser.error("--max_samples and --workers must be >= 0")
    check_pixel_arguments(args, parser)
    if not split_names(args.val_dataset):
        parser.error("--val_dataset is empty: name at least one split, e.g. 'ReasonSeg|val'")
    if not Path(args.dataset_dir).is_dir():
        parser.error(f"--dataset_dir {args.dataset_dir}: directory not found (see dataset/README.md)")
    if args.save_detections:
        if not any(val_split_kind(name) == "coco" for name in split_names(args.val_dataset)):
            parser.error("--save_detections needs a COCO-format split in --val_dataset "
                         "('coco|<instances.json>|<image_dir>'): detections are written for those only")
        if args.protocol == TEACHER_FORCED:
            parser.error("--save_detections needs --protocol generate (or both): teacher forcing gives the model "
                         "the number of instances, so its masks are not detections")
    return args
