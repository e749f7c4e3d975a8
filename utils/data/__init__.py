"""The raw data layer: datasets that read every supported source into :class:`RawSample`.

Nothing here tokenises; the processor step turns a ``RawSample`` into model inputs.
See ``dataset/README.md`` for the on-disk layouts.
"""

from utils.data.base import Mode, RawDataset
from utils.data.builders import (
    TrainDataConfig,
    build_source_dataset,
    build_train_dataset,
    build_val_dataset,
    build_val_datasets,
    parse_sample_rates,
    split_names,
)
from utils.data.coco_instances import CocoCategoryDataset, CocoInstancesDataset, PacoLvisDataset, PascalPartDataset
from utils.data.hybrid import HybridDataset, UnreadableSourceError
from utils.data.io import load_image_rgb, load_label_map
from utils.data.reason_seg import ReasonSegDataset
from utils.data.refer import GRefCocoDataset, ReferSegDataset
from utils.data.sample import IGNORE_LABEL, SEG_TOKEN, CorruptSampleError, EmptySampleError, RawSample
from utils.data.samplers import ShardedEvalSampler
from utils.data.sem_seg import Ade20kDataset, CocoStuffDataset, LabelMapDataset, MapillaryDataset
from utils.data.synthetic_writer import write_synthetic_dataset
from utils.data.targets import TargetDataset
from utils.data.vqa import LlavaVqaDataset

__all__ = [
    "Ade20kDataset",
    "CocoCategoryDataset",
    "CocoInstancesDataset",
    "CocoStuffDataset",
    "CorruptSampleError",
    "EmptySampleError",
    "GRefCocoDataset",
    "HybridDataset",
    "IGNORE_LABEL",
    "LabelMapDataset",
    "LlavaVqaDataset",
    "MapillaryDataset",
    "Mode",
    "PacoLvisDataset",
    "PascalPartDataset",
    "RawDataset",
    "RawSample",
    "ReasonSegDataset",
    "ReferSegDataset",
    "SEG_TOKEN",
    "ShardedEvalSampler",
    "TargetDataset",
    "TrainDataConfig",
    "UnreadableSourceError",
    "build_source_dataset",
    "build_train_dataset",
    "build_val_dataset",
    "build_val_datasets",
    "load_image_rgb",
    "load_label_map",
    "parse_sample_rates",
    "split_names",
    "write_synthetic_dataset",
]
