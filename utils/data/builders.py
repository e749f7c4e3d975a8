"""From the command-line strings users know from LISA to datasets.

Training::

    --dataset "sem_seg||refer_seg||vqa||reason_seg"  --sample_rates "9,3,3,1"
    --sem_seg_data "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
    --refer_seg_data "refclef||refcoco||refcoco+||refcocog"   (also "grefcoco", "refcocog|google")
    --vqa_data "llava_instruct_150k"   --reason_seg_data "ReasonSeg|train"
    --coco_data "my/instances.json|my/images"   (source kind "coco": users' own COCO files)

Validation (:func:`build_val_dataset`): ``ReasonSeg|val``, ``ReasonSeg|test``,
``refcoco|unc|val``, ``refcoco|unc|testA``, ``refcoco+|unc|testB``, ``refcocog|umd|test``,
``grefcoco|unc|val``, ``coco|<instances.json>|<image_dir>`` (a COCO-format file read for
detection: every category asked about every image, one ``[SEG]`` per instance; add ``|present``
to ask only the categories an image contains), and on a synthetic root ``synthetic|val`` (its
ReasonSeg val split), ``synthetic|refer_val`` (its refcoco val split), ``synthetic|grefer_val``
(its gRefCOCO val).
A ReasonSeg split holds the first query of each image unless ``reason_seg_queries="all"``
(``--reason_seg_queries`` of test.py and train_ddp.py, which both build their splits here).

``answer_style`` (``"plain"`` or ``"named"``, :data:`templates.ANSWER_STYLES`) words every mask
answer, in training (``--answer_style``) and validation alike: teacher-forced scores feed the
answers in the style the model was trained with (test.py reads it from the model's config).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from utils.data.base import Mode, RawDataset
from utils.data.coco_instances import (
    CocoDetectionDataset,
    CocoInstancesDataset,
    PacoLvisDataset,
    PascalPartDataset,
)
from utils.data.hybrid import HybridDataset
from utils.data.reason_seg import ReasonSegDataset
from utils.data.refer import GRefCocoDataset, ReferSegDataset
from utils.data.sample import RawSample
from utils.data.sem_seg import Ade20kDataset, CocoStuffDataset, MapillaryDataset
from utils.data.synthetic_writer import MARKER_FILE, is_synthetic_root
from utils.data.vqa import LlavaVqaDataset
from utils.dataset_names import SYNTHETIC_VAL_SPLITS, split_names, val_split_kind

SOURCE_KINDS: tuple[str, ...] = ("sem_seg", "refer_seg", "vqa", "reason_seg", "coco")
SEM_SEG_DATASETS: dict[str, Callable[..., RawDataset]] = {
    "ade20k": Ade20kDataset,
    "cocostuff": CocoStuffDataset,
    "pascal_part": PascalPartDataset,
    "paco_lvis": PacoLvisDataset,
    "mapillary": MapillaryDataset,
}
REFER_SEG_DATASETS: tuple[str, ...] = ("refclef", "refcoco", "refcoco+", "refcocog", "grefcoco")


def parse_sample_rates(spec: str | Sequence[float]) -> list[float]:
    """``"9,3,3,1"`` -> ``[9.0, 3.0, 3.0, 1.0]``; sequences pass through as floats."""
    if isinstance(spec, str):
        try:
            return [float(part) for part in spec.split(",") if part.strip()]
        except ValueError as error:
            raise ValueError(f"sample rates must be comma-separated numbers, got {spec!r}") from error
    return [float(rate) for rate in spec]


def _unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
    return ValueError(f"unknown {kind} dataset {name!r}; known: {', '.join(known)}")


def build_source_dataset(
    kind: str,
    spec: str,
    dataset_dir: str,
    mode: Mode = "train",
    seed: int = 0,
    num_questions_per_image: int = 3,
    name: str | None = None,
    answer_style: str = "plain",
    **options: Any,
) -> RawDataset:
    """One dataset of a source kind from its LISA-style spec.

    ``kind``/``spec`` examples: ``sem_seg``/``ade20k`` (optionally ``ade20k|validation``),
    ``refer_seg``/``refcoco`` (train split) or ``refcoco|unc|val``, ``vqa``/``llava_instruct_150k``,
    ``reason_seg``/``ReasonSeg|train``, ``coco``/``instances.json|images`` (relative to
    ``dataset_dir`` or absolute). ``answer_style`` words the mask answers (every source takes
    it). ``options`` go to the dataset class (e.g. ``explanatory_rate``).
    """
    common = {
        "mode": mode, "seed": seed, "num_questions_per_image": num_questions_per_image, "answer_style": answer_style,
    }
    if name is not None:
        common["name"] = name
    parts = spec.split("|")
    if kind == "sem_seg":
        if parts[0] not in SEM_SEG_DATASETS:
            raise _unknown(kind, parts[0], list(SEM_SEG_DATASETS))
        split = {"split": parts[1]} if len(parts) > 1 else {}
        return SEM_SEG_DATASETS[parts[0]](dataset_dir, **split, **common, **options)
    if kind == "refer_seg":
        ref_dataset = parts[0]
        if ref_dataset not in REFER_SEG_DATASETS:
            raise _unknown(kind, ref_dataset, REFER_SEG_DATASETS)
        split_by = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 else "train"
        if ref_dataset == "grefcoco":
            return GRefCocoDataset(dataset_dir, split_by, split, **common, **options)
        return ReferSegDataset(dataset_dir, ref_dataset, split_by, split, **common, **options)
    if kind == "reason_seg":
        folder = parts[0] or "ReasonSeg"
        split = parts[1] if len(parts) > 1 else "train"
        return ReasonSegDataset(dataset_dir, split, folder=folder, **common, **options)
    if kind == "vqa":
        return LlavaVqaDataset(dataset_dir, spec, **common, **options)
    if kind == "coco":
        if len(parts) != 2:
            raise ValueError(f"coco data must be 'annotations.json|image_dir', got {spec!r}")
        annotation_file, image_dir = (os.path.join(dataset_dir, part) for part in parts)
        return CocoInstancesDataset(annotation_file, image_dir, **common, **options)
    raise _unknown("source kind", kind, SOURCE_KINDS)


@dataclass
class TrainDataConfig:
    """Every setting of the training mixture, with LISA's defaults.

    ``explanatory`` is LISA's flag (-1 disables explanatory ReasonSeg answers); it sets
    ``text_only_rate = explanatory`` and ``explanatory_rate = (1 - explanatory) / 2`` unless those
    two are given. ``answer_style`` words the mask answers of every source (``"plain"``: LISA's
    templates; ``"named"``: the target named before its ``[SEG]``).
    """

    dataset_dir: str = "./dataset"
    dataset: str = "sem_seg||refer_seg||vqa||reason_seg"
    sample_rates: str = "9,3,3,1"
    sem_seg_data: str = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
    refer_seg_data: str = "refclef||refcoco||refcoco+||refcocog"
    vqa_data: str = "llava_instruct_150k"
    reason_seg_data: str = "ReasonSeg|train"
    coco_data: str = ""
    explanatory: float = 0.1
    explanatory_rate: float | None = None
    text_only_rate: float | None = None
    num_questions_per_image: int = 3
    samples_per_epoch: int = 500 * 8 * 2 * 10
    seed: int = 0
    sub_dataset_weighting: str = "uniform"
    answer_style: str = "plain"

    @classmethod
    def from_args(cls, args: Any = None, **overrides: Any) -> "TrainDataConfig":
        """Read the fields from an ``argparse.Namespace``-like object, then apply ``overrides``.

        ``num_classes_per_sample`` (LISA's name) is accepted for ``num_questions_per_image``.
        """
        values: dict[str, Any] = {}
        if args is not None:
            if getattr(args, "num_classes_per_sample", None) is not None:
                values["num_questions_per_image"] = args.num_classes_per_sample
            for item in fields(cls):
                if getattr(args, item.name, None) is not None:
                    values[item.name] = getattr(args, item.name)
        unknown = set(overrides) - {item.name for item in fields(cls)}
        if unknown:
            raise TypeError(f"unknown training-data settings: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    def reason_seg_rates(self) -> dict[str, float]:
        """``explanatory_rate`` and ``text_only_rate`` after applying LISA's ``explanatory``."""
        if self.explanatory_rate is not None or self.text_only_rate is not None:
            return {"explanatory_rate": self.explanatory_rate or 0.0, "text_only_rate": self.text_only_rate or 0.0}
        if self.explanatory < 0:
            return {"explanatory_rate": 0.0, "text_only_rate": 0.0}
        return {"explanatory_rate": (1 - self.explanatory) / 2, "text_only_rate": self.explanatory}

    def source_specs(self, kind: str) -> list[str]:
        """The ``||``-separated specs of a source kind."""
        spec = {
            "sem_seg": self.sem_seg_data,
            "refer_seg": self.refer_seg_data,
            "vqa": self.vqa_data,
            "reason_seg": self.reason_seg_data,
            "coco": self.coco_data,
        }.get(kind)
        if spec is None:
            raise _unknown("source kind", kind, SOURCE_KINDS)
        specs = split_names(spec)
        if not specs:
            raise ValueError(f"source {kind!r} is in --dataset but its data list is empty")
        return specs


def build_train_dataset(
    args: Any = None, transform: Callable[[RawSample], Any] | None = None, rank: int = 0, **overrides: Any
) -> HybridDataset:
    """The training :class:`HybridDataset` from an args-like object and/or keyword settings.

    Settings are the fields of :class:`TrainDataConfig` (keywords override ``args``).

    Raises:
        UnreadableSourceError (a ValueError): a (sub-)dataset none of whose first few items can be
            read (see :meth:`HybridDataset.check_sources`), so that a wrong layout stops the run
            before training instead of being redrawn sample after sample.
    """
    config = TrainDataConfig.from_args(args, **overrides)
    kinds = split_names(config.dataset)
    rates = parse_sample_rates(config.sample_rates)
    if len(rates) != len(kinds):
        raise ValueError(
            f"--sample_rates {config.sample_rates!r} has {len(rates)} rates for {len(kinds)} sources {kinds}"
        )
    sources: dict[str, list[RawDataset]] = {}
    for kind in kinds:
        options = config.reason_seg_rates() if kind == "reason_seg" else {}
        sources[kind] = [
            build_source_dataset(
                kind, spec, config.dataset_dir, "train", config.seed, config.num_questions_per_image,
                answer_style=config.answer_style, **options,
            )
            for spec in config.source_specs(kind)
        ]
    dataset = HybridDataset(
        sources, rates, config.samples_per_epoch, config.seed, transform,
        sub_dataset_weighting=config.sub_dataset_weighting, rank=rank,  # type: ignore[arg-type]
    )
    dataset.check_sources()
    return dataset


def coco_detection_dataset(name: str, dataset_dir: str, **options: Any) -> CocoDetectionDataset:
    """``coco|<instances.json>|<image_dir>[|present]`` (paths relative to ``dataset_dir`` or
    absolute) as a :class:`CocoDetectionDataset`."""
    parts = name.split("|")
    present = len(parts) == 4 and parts[3] == "present"
    if len(parts) not in (3, 4) or (len(parts) == 4 and not present) or not parts[1] or not parts[2]:
        raise ValueError(
            f"a COCO-format split is 'coco|<instances.json>|<image_dir>' or 'coco|<instances.json>|<image_dir>|present', "
            f"got {name!r}"
        )
    annotation_file, image_dir = (os.path.join(dataset_dir, part) for part in parts[1:3])
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file} not found (split {name!r})")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder {image_dir} not found (split {name!r})")
    return CocoDetectionDataset(annotation_file, image_dir, present_only=present, **options)


def build_val_dataset(name: str, dataset_dir: str, reason_seg_queries: str = "first", **options: Any) -> RawDataset:
    """A validation dataset (mode ``"val"``) from a name such as ``refcoco|unc|testA``.

    ``reason_seg_queries`` (ReasonSeg splits only): ``"first"`` scores the first query of each
    image (LISA's protocol, the default of test.py and of training validation), ``"all"`` every
    query. ``options`` go to the dataset class, among them ``answer_style`` (``"plain"`` by
    default; give the style the model was trained with).
    """
    name = name.strip()
    if reason_seg_queries not in ("first", "all"):
        raise ValueError(f"reason_seg_queries must be 'first' or 'all', got {reason_seg_queries!r}")
    if val_split_kind(name) == "reason_seg":
        options = {"val_queries": reason_seg_queries, **options}
    if val_split_kind(name) == "coco":
        return coco_detection_dataset(name, dataset_dir, **options)
    if name in SYNTHETIC_VAL_SPLITS:
        if not is_synthetic_root(dataset_dir):
            raise FileNotFoundError(
                f"{name!r} reads a synthetic root, but {os.path.join(dataset_dir, MARKER_FILE)} does not exist; "
                "create one with tools/make_synthetic.py --out DIR and pass DIR as dataset_dir"
            )
        kind, spec, label = SYNTHETIC_VAL_SPLITS[name]
        return build_source_dataset(kind, spec, dataset_dir, "val", name=label, **options)
    parts = name.split("|")
    if len(parts) == 2 and parts[0] != "synthetic":
        return build_source_dataset("reason_seg", name, dataset_dir, "val", **options)
    if len(parts) == 3:
        return build_source_dataset("refer_seg", name, dataset_dir, "val", **options)
    raise ValueError(
        f"unknown validation dataset {name!r}; expected 'ReasonSeg|<split>', '<refer dataset>|<splitBy>|<split>' "
        f"(refer datasets: {', '.join(REFER_SEG_DATASETS)}), 'coco|<instances.json>|<image_dir>' or one of "
        f"{', '.join(SYNTHETIC_VAL_SPLITS)}"
    )


def build_val_datasets(names: str, dataset_dir: str, **options: Any) -> dict[str, RawDataset]:
    """Several validation datasets from ``"ReasonSeg|val||refcoco|unc|val"``; ``options`` as
    :func:`build_val_dataset` (``reason_seg_queries``, ``answer_style`` ...)."""
    return {name: build_val_dataset(name, dataset_dir, **options) for name in split_names(names)}
