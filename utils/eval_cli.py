"""test.py's work: parse the flags, load the model, score every split under every protocol, report.

Runs as one process or under torchrun (each rank scores its shard of every split; the integer
metric sums are all-reduced, so the numbers do not depend on the number of processes). Rank 0
prints the table and writes the JSON report (and merges the saved predictions). On a COCO-format
split (``coco|instances.json|image_dir``) under ``generate``, rank 0 also writes the detections
file (COCO results format, ``--save_detections``) and scores it with pycocotools' COCOeval.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

from model.config import SegmenterConfig
from model.constants import EVAL_PROTOCOLS, GENERATE, TEACHER_FORCED
from model.decoding import resolve_decoding
from model.image_tokens import pixel_limits
from model.sam_compile import compile_image_encoder_as_asked
from utils.data.builders import build_val_dataset
from utils.data.sample import CorruptSampleError
from utils.dataset_names import split_names, val_split_kind
from utils.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from utils.eval_args import DETECTIONS_NAME, REPORT_NAME, TABLE_NAME, parse_args
from utils.eval_report import PredictionWriter, build_report, format_summary, result_entry, write_json
from utils.evaluation import QUERY_LENGTH_GROUPS, NothingScoredError, evaluate, query_length_group

logger = logging.getLogger(__name__)

def build_splits(names: str, dataset_dir: str, reason_seg_queries: str, answer_style: str = "plain") -> dict:
    """Every requested split, checked before the model loads (a wrong name costs no model load).

    ``answer_style`` words the reference answers (the model's ``config.answer_style``), so that
    teacher forcing feeds the answers in the style the model was trained with.
    """
    splits = {}
    for name in split_names(names):
        try:
            # The same call as training validation (train_ddp.py), so both score the same items.
            dataset = build_val_dataset(
                name, dataset_dir, reason_seg_queries=reason_seg_queries, answer_style=answer_style
            )
        except (FileNotFoundError, ValueError, CorruptSampleError) as error:  # the last: an inconsistent index file
            raise SystemExit(f"error: split {name!r}: {error}") from None
        if len(dataset) == 0:
            raise SystemExit(f"error: split {name!r} in {dataset_dir} is empty (0 items): there is nothing to score")
        splits[name] = dataset
    return splits


def output_dir(args: argparse.Namespace) -> Path:
    """Where the table (and the default detections file) go: beside ``--report`` when it is
    given, else ``--log_dir``."""
    return Path(args.report).parent if args.report else Path(args.log_dir)


def detections_paths(args: argparse.Namespace, names: list[str]) -> dict[str, Path]:
    """Split name -> its detections file, for the COCO-format splits among ``names``."""
    coco = [name for name in names if val_split_kind(name) == "coco"]
    base = Path(args.save_detections) if args.save_detections else output_dir(args) / DETECTIONS_NAME
    if len(coco) == 1:
        return {coco[0]: base}
    return {name: base.with_name(f"{base.stem}_{k}{base.suffix or '.json'}") for k, name in enumerate(coco, 1)}


def _gather(records: list) -> list:
    """Every rank's records, in rank order (this rank's own without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(records)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [record for part in gathered for record in part]


def coco_ap_of_split(
    raw_dataset, evaluated: int, detections: list, path: Path, unreadable: Iterable[int] = ()
) -> dict:
    """Write ``detections`` (COCO results) to ``path`` and score them with COCOeval, over the
    images every item of which was evaluated (the first ``evaluated`` items of the split) and
    read: an image with an item in ``unreadable`` (item indices of the split) is left out and
    counted (``unreadable_images``), as its unanswered requests would count as the model's misses."""
    from utils.metrics import coco_average_precision

    detections = sorted(detections, key=lambda d: (d["image_id"], d["category_id"]))  # stable: answer order kept
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(detections) + "\n", encoding="utf-8")
    unreadable = set(unreadable)
    evaluated_images = {image: items for image, items in raw_dataset.image_items().items() if max(items) < evaluated}
    left_out = {image for image, items in evaluated_images.items() if unreadable.intersection(items)}
    images = sorted(evaluated_images.keys() - left_out)
    if not images:
        logger.warning("%s: no image had all its requests answered (--max_samples %d, %d images with an "
                       "unreadable item); no COCO AP", path, evaluated, len(left_out))
    result = {
        iou_type: coco_average_precision(raw_dataset.annotation_file, str(path), iou_type, images)
        for iou_type in ("bbox", "segm")
    }
    logger.info("%d detections written to %s; COCO box AP %s, mask AP %s over %d images "
                "(%d left out: an item of theirs was unreadable)",
                len(detections), path, result["bbox"]["AP"], result["segm"]["AP"], len(images), len(left_out))
    return {
        **result,
        "images": len(images),
        "unreadable_images": len(left_out),
        "detections": len(detections),
        "detections_file": str(path.resolve()),
        "annotation_file": str(Path(raw_dataset.annotation_file).resolve()),
    }


def teacher_forcing_left_nothing(counts: dict) -> str | None:
    """Why teacher forcing scored nothing on a split, when the reason is its no-target expressions
    (which the generate protocol scores, with N-acc); None for any other reason (e.g. every item
    unreadable), which is an error under every protocol."""
    if not counts.get("excluded_no_target"):
        return None
    unreadable = f", {counts['unreadable']} unreadable items" if counts.get("unreadable") else ""
    return (
        f"nothing to score: {counts['excluded_no_target']} of {counts['questions']} questions are no-target "
        f"expressions{unreadable}; teacher forcing cannot score those (their given answer has no [SEG]), the "
        "generate protocol does (N-acc)"
    )


def resolve_model(args: argparse.Namespace) -> tuple[Path, SegmenterConfig]:
    """The checkpoint directory that ``--version`` / ``--pick`` name, and its config.

    Reads config.json only, no weights: :func:`run` needs the config's ``answer_style`` to build
    the splits, which are checked before the model loads.
    """
    from model.loading import ModelLoadError, resolve_checkpoint

    try:
        directory = resolve_checkpoint(args.version, args.pick)
        return directory, SegmenterConfig.from_pretrained(directory)
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def model_and_splits(args: argparse.Namespace) -> tuple[tuple[Path, SegmenterConfig], dict]:
    """(:func:`resolve_model`, :func:`build_splits`): the splits word their answers as the model
    was trained (its config's ``answer_style``); both are read before any weight loads."""
    directory, config = resolve_model(args)
    splits = build_splits(args.val_dataset, args.dataset_dir, args.reason_seg_queries, config.answer_style)
    return (directory, config), splits


def load_model(
    args: argparse.Namespace, device: torch.device, resolved: tuple[Path, SegmenterConfig] | None = None
):
    """(model, resolved checkpoint directory, model description for the report).

    ``resolved``: what :func:`resolve_model` returned, when the caller has it already.
    """
    from model.loading import ModelLoadError, load_segmenter

    directory, config = resolved or resolve_model(args)
    try:
        model = load_segmenter(
            directory,
            precision=args.precision,
            device=device,
            base_model=args.base_model,
            vision_pretrained=args.vision_pretrained,
            min_pixels=getattr(args, "min_pixels", None),
            max_pixels=getattr(args, "max_pixels", None),
        )
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    sam_compiled = compile_image_encoder_as_asked(model.sam.image_encoder, args.compile_sam, device)  # default: CUDA
    kind = "training checkpoint (LoRA adapter on a base model)" if config.adapter_path else "standalone model"
    limits = pixel_limits(model.processor)
    dtype = str(next(model.vlm.parameters()).dtype).removeprefix("torch.")
    info = {
        "description": f"{kind}, {config.vlm_family} + SAM {config.sam_variant}, {dtype}, "
                       f"images up to {limits.max_tokens:,} image tokens",
        "version": str(args.version),
        "kind": "adapter" if config.adapter_path else "standalone",
        "vlm_family": config.vlm_family,
        "sam_variant": config.sam_variant,
        "answer_style": config.answer_style,  # how the teacher-forced answers are worded
        "base_model": str(args.base_model or config.vlm_path) if config.adapter_path else None,
        "sam_checkpoint": model.config.sam_checkpoint,
        "dtype": dtype,
        "device": str(device),
        "sam_encoder_compiled": sam_compiled,  # --compile_sam, resolved (auto: on CUDA)
        # What the model sees of an image (flags, else the checkpoint's values capped at the default).
        "min_pixels": limits.min_pixels,
        "max_pixels": limits.max_pixels,
        "max_image_tokens": limits.max_tokens,
    }
    return model, str(Path(directory).resolve()), info


def run(args: argparse.Namespace, dist_info: DistInfo) -> dict | None:
    """Score every split under every protocol; returns the report on rank 0 (None elsewhere)."""
    resolved, splits = model_and_splits(args)
    model, checkpoint, model_info = load_model(args, dist_info.device, resolved)
    precision = args.precision or ("bf16" if dist_info.device.type == "cuda" else "fp32")
    protocols = list(EVAL_PROTOCOLS) if args.protocol == "both" else [args.protocol]
    writer = PredictionWriter(args.save_predictions, dist_info.rank) if args.save_predictions else None
    detection_files = detections_paths(args, list(splits)) if GENERATE in protocols else {}
    results = []
    try:
        for name, dataset in splits.items():
            split_items = len(dataset)
            if args.max_samples:
                dataset = torch.utils.data.Subset(dataset, range(min(split_items, args.max_samples)))
            reason_seg = val_split_kind(name) == "reason_seg"
            for protocol in protocols:
                detections = [] if protocol == GENERATE and name in detection_files else None
                unreadable: list[int] = []
                if dist_info.is_main:
                    logger.info("scoring %s (%d items) under %s", name, len(dataset), protocol)
                try:
                    scores = evaluate(
                        model,
                        dataset,
                        protocol,
                        rank=dist_info.rank,
                        world_size=dist_info.world_size,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        precision=precision,
                        description=f"{protocol} {name}",
                        show_progress=dist_info.is_main and not args.no_progress,
                        groups=QUERY_LENGTH_GROUPS if reason_seg else (),
                        group_of=query_length_group if reason_seg else None,
                        on_prediction=writer.sink(name) if writer else None,
                        max_new_tokens=args.max_new_tokens,
                        generate_kwargs={"decoding": args.decoding},
                        on_detections=detections.extend if detections is not None else None,
                        on_unreadable=unreadable.extend,
                    )
                except NothingScoredError as error:
                    # Under both protocols a split that only generation can score (no-target
                    # expressions) is reported as such and the run goes on. The error comes after
                    # the all-reduce, with the same counts on every rank: all ranks branch alike.
                    reason = None
                    if protocol == TEACHER_FORCED and GENERATE in protocols:
                        reason = teacher_forcing_left_nothing(error.counts)
                    if reason is None:
                        raise SystemExit(f"error: {error}") from None
                    if dist_info.is_main:
                        logger.warning("%s: not scored under %s, %s", name, protocol, reason)
                    counts = {**error.counts, "count": 0}
                    results.append(result_entry(name, protocol, counts, split_items, len(dataset), not_scored=reason))
                    continue
                except ValueError as error:
                    raise SystemExit(f"error: {error}") from None
                entry = result_entry(name, protocol, scores, split_items, len(dataset))
                if detections is not None:
                    detections = _gather(detections)
                    unreadable = _gather(unreadable)
                    if dist_info.is_main:
                        # ``dataset`` is a prefix of the split: its item indices are the split's.
                        entry["coco_ap"] = coco_ap_of_split(
                            splits[name], len(dataset), detections, detection_files[name], unreadable
                        )
                results.append(entry)
                if scores["excluded_no_target"] and GENERATE not in protocols and dist_info.is_main:
                    logger.warning(
                        "%s: %d no-target expressions are not scored under teacher forcing; "
                        "--protocol generate (or both) scores them and N-acc", name, scores["excluded_no_target"],
                    )
        if writer is not None:
            writer.close()
            barrier()
            if dist_info.is_main:
                count = writer.merge(dist_info.world_size)
                logger.info("%d predictions written to %s", count, args.save_predictions)
    except BaseException:  # Ctrl-C too: nothing of a failed run stays beside --save_predictions
        if writer is not None:
            writer.discard()
        raise
    if not dist_info.is_main:
        return None
    run_info = {
        "world_size": dist_info.world_size,
        "batch_size": args.batch_size,
        "precision": precision,
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "val_dataset": args.val_dataset,
        "reason_seg_queries": args.reason_seg_queries,
        "max_samples": args.max_samples,
        "max_new_tokens": args.max_new_tokens if GENERATE in protocols else None,
        "decoding": resolve_decoding(args.decoding, model.device) if GENERATE in protocols else None,
        "predictions": str(Path(args.save_predictions).resolve()) if args.save_predictions else None,
        "detections": {name: str(path.resolve()) for name, path in detection_files.items()} or None,
        "command": getattr(args, "command", None),
    }
    return build_report(model_info, checkpoint, run_info, results)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(
    argv: list[str] | None = None, say: Callable[[str], None] = logger.info, args: argparse.Namespace | None = None
) -> int:
    """test.py: parse, evaluate, write the report; the results table goes to ``say``
    (test.py passes ``print``). ``args``: ``argv`` parsed already (test.py parses before it
    imports this module, so that ``--help`` does not wait for torch)."""
    if args is None:
        args = parse_args(argv)
    # torchrun stops the other ranks with SIGTERM when one fails (a cluster cancels a job so): as
    # an exception, it lets each rank clean up (its --save_predictions part) on the way out.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    args.command = shlex.join(["test.py", *(sys.argv[1:] if argv is None else argv)])  # pastes back into a shell
    dist_info = init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist_info.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {dist_info.rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        report = run(args, dist_info)
        if report is not None:
            summary = format_summary(report)
            say(summary)
            report_path = Path(args.report) if args.report else Path(args.log_dir) / REPORT_NAME
            write_json(report_path, report)
            table_path = output_dir(args) / TABLE_NAME
            table_path.parent.mkdir(parents=True, exist_ok=True)
            table_path.write_text(summary + "\n", encoding="utf-8")
            say(f"report: {report_path}")
    finally:
        cleanup_distributed()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0
