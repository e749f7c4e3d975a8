"""The training mixture: sources drawn by sample rate, reproducibly, with corrupt samples replaced.

Item ``i`` of epoch ``e`` on rank ``r`` is a pure function of ``(seed, e, r, i)``:

1. the source (``sem_seg``, ``refer_seg`` ...) is drawn with probability proportional to its
   sample rate from ``derive_rng(seed, e, r, i)``;
2. attempt ``a = 0, 1, ...`` draws, from ``derive_rng(seed, e, r, i, a)``, a sub-dataset of that
   source (uniformly, as LISA does, or in proportion to sizes), an item index in it, and all the
   sample's own random choices; it then builds the sample and applies ``transform``;
3. if the attempt raises (corrupt image or annotation, empty label map, any exception of the
   transform), the error is logged with the file, counted, and attempt ``a + 1`` runs, still
   within the same source so the mix keeps its proportions. ``max_consecutive_failures``
   failed attempts for one item raise a ``RuntimeError`` listing the errors.

A source that cannot be read at all (a whole dataset in the wrong layout: every image in another
folder, every annotation in another format) would otherwise be redrawn silently, item after item.
:meth:`HybridDataset.check_sources` (called by ``build_train_dataset``) reads a few items of each
(sub-)dataset before training and raises :class:`UnreadableSourceError`, naming the source, the
paths tried and the first error, when none of them can be read.

Skip accounting: DataLoader workers are separate processes, so a counter on the dataset object
only counts the skips of the process it lives in (``num_skipped``). Every sample therefore
carries its own count, ``sample.meta["num_skipped"]`` (failed attempts replaced to produce this
item), set before ``transform`` runs; summing it over the samples a trainer consumes gives the
exact number of skipped samples across all workers and ranks with no double counting. A
transform should carry it on (e.g. into the batch), with ``sample.meta["source"]`` (all the
attempts of one item are in the same source) for per-source counts.

Epochs: call :meth:`HybridDataset.set_epoch` before iterating each epoch (DataLoader workers
receive the dataset when the iterator is created, so this reaches them unless
``persistent_workers=True``). Ranks: call :meth:`set_rank` (or pass ``rank=``) so that ranks
draw different samples even if they iterate the same indices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from utils.data.rng import derive_rng
from utils.data.sample import CorruptSampleError, RawSample

logger = logging.getLogger(__name__)

SubDatasetWeighting = Literal["uniform", "size"]
SourceSpec = torch.utils.data.Dataset | Sequence[torch.utils.data.Dataset]


PROBE_ITEMS = 8
"""Items of each (sub-)dataset :meth:`HybridDataset.check_sources` tries before giving up on it."""


class UnreadableSourceError(ValueError):
    """None of the items tried of a training source could be read (see ``check_sources``)."""


def normalise_rates(rates: Sequence[float]) -> np.ndarray:
    """Rates as probabilities; they must be non-negative with a positive sum."""
    array = np.asarray(rates, dtype=np.float64)
    if array.ndim != 1 or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"sample rates must be non-negative with a positive sum, got {list(rates)}")
    return array / array.sum()


class HybridDataset(torch.utils.data.Dataset):
    """Mixes named sources by sample rate; ``len()`` is ``samples_per_epoch``.

    Args:
        sources: ``{name: dataset or list of sub-datasets}``; datasets are :class:`RawDataset`
            (anything with ``get_sample(index, rng)``; plain datasets are indexed instead).
        sample_rates: one rate per source (in ``sources`` order) or ``{name: rate}``; ``None``
            means equal rates.
        samples_per_epoch: number of items of an epoch.
        seed: base seed of every draw.
        transform: optional ``RawSample -> anything``, applied in ``__getitem__`` (so in the
            DataLoader workers); its exceptions count as corrupt samples.
        sub_dataset_weighting: ``"uniform"`` (each sub-dataset of a source equally likely, as
            LISA does) or ``"size"`` (in proportion to ``len()``).
        max_consecutive_failures: failed attempts tolerated for one item before raising.
        rank: the distributed rank (also settable with :meth:`set_rank`).
    """

    def __init__(
        self,
        sources: Mapping[str, SourceSpec],
        sample_rates: Sequence[float] | Mapping[str, float] | None = None,
        samples_per_epoch: int = 10000,
        seed: int = 0,
        transform: Callable[[RawSample], Any] | None = None,
        sub_dataset_weighting: SubDatasetWeighting = "uniform",
        max_consecutive_failures: int = 32,
        rank: int = 0,
    ) -> None:
        if not sources:
            raise ValueError("HybridDataset needs at least one source")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if sub_dataset_weighting not in ("uniform", "size"):
            raise ValueError(f"sub_dataset_weighting must be 'uniform' or 'size', got {sub_dataset_weighting!r}")
        self.source_names = list(sources)
        self.sources: list[list[torch.utils.data.Dataset]] = []
        self.sub_dataset_probabilities: list[np.ndarray] = []
        for name in self.source_names:
            spec = sources[name]
            datasets = list(spec) if isinstance(spec, (list, tuple)) else [spec]
            sizes = [len(dataset) for dataset in datasets]
            if not datasets or min(sizes) == 0:
                raise ValueError(f"source {name!r} has an empty (sub-)dataset: sizes {sizes}")
            self.sources.append(datasets)
            weights = sizes if sub_dataset_weighting == "size" else [1.0] * len(datasets)
            self.sub_dataset_probabilities.append(normalise_rates(weights))
        if sample_rates is None:
            rates: Sequence[float] = [1.0] * len(self.source_names)
        elif isinstance(sample_rates, Mapping):
            unknown = set(sample_rates) - set(self.source_names)
            if unknown:
                raise ValueError(f"sample rates for unknown sources {sorted(unknown)}; sources: {self.source_names}")
            rates = [float(sample_rates.get(name, 0.0)) for name in self.source_names]
        else:
            rates = list(sample_rates)
        if len(rates) != len(self.source_names):
            raise ValueError(f"{len(rates)} sample rates for {len(self.source_names)} sources {self.source_names}")
        self.source_probabilities = normalise_rates(rates)
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        self.epoch = 0
        self.rank = rank
        self.num_skipped = 0
        logger.info("HybridDataset: %s", self.describe())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns."""
        self.epoch = epoch

    def set_rank(self, rank: int) -> None:
        """Select the distributed rank (ranks draw different samples)."""
        self.rank = rank

    def __len__(self) -> int:
        return self.samples_per_epoch

    def describe(self) -> dict[str, Any]:
        """Probabilities and sizes of every source and sub-dataset."""
        return {
            name: {
                "probability": round(float(probability), 4),
                "sub_datasets": {
                    getattr(dataset, "name", type(dataset).__name__): {
                        "size": len(dataset),
                        "probability": round(float(p), 4),
                    }
                    for dataset, p in zip(datasets, sub_probabilities)
                },
            }
            for name, probability, datasets, sub_probabilities in zip(
                self.source_names, self.source_probabilities, self.sources, self.sub_dataset_probabilities
            )
        }

    def check_sources(self, max_items: int = PROBE_ITEMS) -> None:
        """Make sure every (sub-)dataset of every source can give a sample.

        Reads up to ``max_items`` items of each, spread over its length and stopping at the first
        that works (normally one read per dataset). Single bad files are left to ``__getitem__``
        (skipped, counted, replaced).

        Raises:
            UnreadableSourceError: for the first dataset none of whose tried items could be read;
                the message names the source, the dataset, the paths tried and the first error.
        """
        for name, datasets, probability in zip(self.source_names, self.sources, self.source_probabilities):
            if probability == 0:
                continue  # never drawn
            for dataset in datasets:
                problem = _probe(dataset, max_items, self.seed)
                if problem:
                    raise UnreadableSourceError(
                        f"training source {name!r} cannot be read: {problem}. Check that its files are in the "
                        "layout of dataset/README.md (tools/inspect_data.py shows what is read), or leave it out "
                        "of --dataset"
                    )

    def draw_source(self, index: int) -> int:
        """The source of item ``index`` in the current epoch and rank."""
        rng = derive_rng(self.seed, self.epoch, self.rank, index)
        return int(rng.choice(len(self.source_names), p=self.source_probabilities))

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range [0, {self.samples_per_epoch})")
        source = self.draw_source(index)
        errors: list[str] = []
        for attempt in range(self.max_consecutive_failures):
            rng = derive_rng(self.seed, self.epoch, self.rank, index, attempt + 1)
            datasets = self.sources[source]
            dataset = datasets[int(rng.choice(len(datasets), p=self.sub_dataset_probabilities[source]))]
            item = int(rng.integers(len(dataset)))
            try:
                sample = self._build(dataset, item, rng)
                if isinstance(sample, RawSample):  # a plain dataset's items carry no meta
                    sample.meta["num_skipped"] = len(errors)
                    sample.meta["skipped_errors"] = list(errors)
                    sample.meta["source"] = self.source_names[source]
                return self.transform(sample) if self.transform is not None else sample
            except Exception as error:  # a corrupt sample must never stop training
                self.num_skipped += 1
                where = f"{getattr(dataset, 'name', type(dataset).__name__)}[{item}]"
                errors.append(f"{where}: {error}")
                if isinstance(error, CorruptSampleError):
                    logger.warning("skipping %s: %s", where, error)
                else:
                    logger.warning("skipping %s after %s: %s", where, type(error).__name__, error, exc_info=True)
        raise RuntimeError(
            f"{self.max_consecutive_failures} consecutive samples of source "
            f"{self.source_names[source]!r} failed (item {index}); errors:\n" + "\n".join(errors)
        )

    @staticmethod
    def _build(dataset: torch.utils.data.Dataset, item: int, rng: np.random.Generator) -> RawSample:
        get_sample = getattr(dataset, "get_sample", None)
        sample = get_sample(item, rng) if get_sample is not None else dataset[item]
        if isinstance(sample, RawSample):
            sample.validate()
        return sample


def _probe(dataset: torch.utils.data.Dataset, max_items: int, seed: int) -> str | None:
    """None if one of up to ``max_items`` items of ``dataset`` builds, else what went wrong."""
    count = min(len(dataset), max(1, max_items))
    items = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count).round()})
    paths: list[str] = []
    first_error = ""
    for item in items:
        try:
            HybridDataset._build(dataset, item, derive_rng(seed, "probe", item))
            return None
        except Exception as error:  # any failure counts, as in __getitem__
            first_error = first_error or f"{type(error).__name__}: {error}"
            item_path = getattr(dataset, "item_path", None)
            try:
                path = item_path(item) if callable(item_path) else None
            except Exception:
                path = None
            if path:
                paths.append(str(path))
    name = getattr(dataset, "name", type(dataset).__name__)
    tried = f"; paths tried: {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}" if paths else ""
    return f"dataset {name!r}: none of the {len(items)} items tried could be read{tried}; first error: {first_error}"
