"""Referring segmentation: refCOCO, refCOCO+, refCOCOg, refCLEF and gRefCOCO.

On disk (``<dataset_dir>/refer_seg/``)::

    <name>/refs(<splitBy>).p      # pickled list of refs (refcoco, refcoco+, refcocog, refclef)
    <name>/instances.json         # COCO-style images / annotations (polygon or RLE)
    grefcoco/grefs(unc).json      # gRefCOCO refs: "ann_id" is a list, [-1] = no target
    grefcoco/instances.json
    images/mscoco/images/train2014/COCO_train2014_*.jpg
    images/saiapr_tc-12/...       # refCLEF images

A ref is ``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", ...}], "category_id"}``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from utils.data.base import Mode, missing_path_error
from utils.data.io import read_json, read_pickle
from utils.data.sample import CorruptSampleError
from utils.data.targets import ImageRecord, Target, TargetDataset

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_BY: dict[str, str] = {
    "refcoco": "unc",
    "refcoco+": "unc",
    "refcocog": "umd",
    "refclef": "unc",
    "grefcoco": "unc",
}
"""The splitBy used when none is given (LISA's choice for training)."""

COCO_IMAGE_DIR = os.path.join("images", "mscoco", "images", "train2014")
CLEF_IMAGE_DIR = os.path.join("images", "saiapr_tc-12")


def image_dir_for(ref_dataset: str) -> str:
    """Image folder (relative to ``refer_seg/``) of a referring dataset."""
    return CLEF_IMAGE_DIR if ref_dataset == "refclef" else COCO_IMAGE_DIR


def ref_sentences(ref: dict[str, Any]) -> tuple[str, ...]:
    """The non-empty sentences of a ref (the preprocessed ``sent``, else ``raw``)."""
    texts = (str(sentence.get("sent", sentence.get("raw", ""))).strip() for sentence in ref["sentences"])
    return tuple(text for text in texts if text)


def ref_ann_ids(ref: dict[str, Any]) -> tuple[int, ...]:
    """The target annotation ids of a ref; empty for gRefCOCO's no-target refs (``[-1]``)."""
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    if ref.get("no_target") or -1 in ids:
        return ()
    return tuple(int(ann_id) for ann_id in ids)


class ReferSegDataset(TargetDataset):
    """Referring expressions of one split with their target masks.

    ``ref_dataset`` is ``refcoco``, ``refcoco+``, ``refcocog`` or ``refclef``; gRefCOCO is read
    by the subclass :class:`GRefCocoDataset`. ``split`` is matched exactly against the refs'
    ``split`` field (``train``, ``val``, ``test``, ``testA``, ``testB`` ...).

    Items (see :class:`TargetDataset`): train: one per image with refs in the split; val: one
    per (ref, sentence). A ref naming several annotations (gRefCOCO) gets ONE mask, the union
    of its targets (as GRES does); a no-target ref gets a text answer and
    ``meta["no_target_gt"]``. Meta key of the ids: ``ref_ids``.
    """

    target_id_key = "ref_ids"
    refs_file_pattern = "refs({split_by}).p"

    def __init__(
        self,
        dataset_dir: str,
        ref_dataset: str = "refcoco",
        split_by: str | None = None,
        split: str = "train",
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        self.ref_dataset = ref_dataset
        self.split_by = split_by or DEFAULT_SPLIT_BY.get(ref_dataset, "unc")
        self.split = split
        refer_root = os.path.join(dataset_dir, "refer_seg")
        data_dir = os.path.join(refer_root, ref_dataset)
        if not os.path.isdir(data_dir):
            raise missing_path_error(f"referring dataset {ref_dataset!r}", data_dir, refer_root)
        refs_path, refs = self._read_refs_file(data_dir)
        targets = [
            Target(int(ref["ref_id"]), int(ref["image_id"]), ref_ann_ids(ref), ref_sentences(ref))
            for ref in refs
            if ref["split"] == split
        ]
        if not any(target.texts for target in targets):
            found = sorted({str(ref["split"]) for ref in refs})
            raise ValueError(f"split {split!r} has no refs in {refs_path}; splits found: {found}")
        images, annotations = self._load_instances(
            os.path.join(data_dir, "instances.json"), os.path.join(refer_root, image_dir_for(ref_dataset)), targets
        )
        super().__init__(
            targets, images, annotations, mode, seed, num_questions_per_image, name or ref_dataset,
            answer_style=answer_style,
        )
        logger.info(
            "%s(%s) %s (%s): %d refs, %d images, %d items",
            ref_dataset, self.split_by, split, mode, len(self.targets), len(self.image_ids), len(self),
        )

    def _read_refs_file(self, data_dir: str) -> tuple[str, list[dict[str, Any]]]:
        path = os.path.join(data_dir, self.refs_file_pattern.format(split_by=self.split_by))
        if not os.path.isfile(path):
            raise missing_path_error("refs file", path, data_dir)
        return path, read_pickle(path)

    @staticmethod
    def _load_instances(
        path: str, image_dir: str, targets: list[Target]
    ) -> tuple[dict[int, ImageRecord], dict[int, dict[str, Any]]]:
        """Keep only the images and annotations the targets need."""
        content = read_json(path)
        wanted_images = {target.image_id for target in targets}
        wanted_anns = {ann_id for target in targets for ann_id in target.ann_ids}
        images = {
            image["id"]: ImageRecord(
                os.path.join(image_dir, image["file_name"]), int(image["height"]), int(image["width"])
            )
            for image in content["images"]
            if image["id"] in wanted_images
        }
        annotations = {ann["id"]: ann for ann in content["annotations"] if ann["id"] in wanted_anns}
        missing = wanted_anns - annotations.keys()
        if missing:
            partial = sum(1 for target in targets if missing.intersection(target.ann_ids))
            logger.warning(
                "%s: %d annotations named by refs are missing; the samples of the %d refs naming one are "
                "unreadable (skipped in training, counted as unreadable in evaluation)",
                path, len(missing), partial,
            )
        if wanted_images - images.keys():
            raise CorruptSampleError(f"{path}: {len(wanted_images - images.keys())} images named by refs are missing")
        return images, annotations


class GRefCocoDataset(ReferSegDataset):
    """gRefCOCO: like refCOCO, but a ref names a list of targets, or ``[-1]`` for none.

    Reads ``refer_seg/grefcoco/grefs(<splitBy>).json`` (or ``.p``) and ``instances.json``;
    images from ``refer_seg/images/mscoco/images/train2014``. Several targets: one union mask;
    no target: text answer, ``meta["no_target"]``, ``meta["no_target_gt"]``.
    """

    refs_file_pattern = "grefs({split_by}).json"

    def __init__(
        self,
        dataset_dir: str,
        split_by: str | None = None,
        split: str = "train",
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        super().__init__(
            dataset_dir, "grefcoco", split_by, split, mode, seed, num_questions_per_image, name, answer_style
        )

    def _read_refs_file(self, data_dir: str) -> tuple[str, list[dict[str, Any]]]:
        json_path = os.path.join(data_dir, self.refs_file_pattern.format(split_by=self.split_by))
        pickle_path = os.path.splitext(json_path)[0] + ".p"
        if os.path.isfile(json_path):
            return json_path, read_json(json_path)
        if os.path.isfile(pickle_path):
            return pickle_path, read_pickle(pickle_path)
        raise missing_path_error("gRefCOCO refs file", json_path, data_dir)
