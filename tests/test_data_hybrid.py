"""The training mixture, skip accounting, evaluation sharding and the CLI-string builders."""

from __future__ import annotations

import argparse
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import data_fixtures as fx
from utils.data import (
    CorruptSampleError,
    HybridDataset,
    RawDataset,
    RawSample,
    ReasonSegDataset,
    ShardedEvalSampler,
    build_train_dataset,
    build_val_dataset,
    build_val_datasets,
    parse_sample_rates,
    split_names,
    write_synthetic_dataset,
)


class FakeDataset(RawDataset):
    """In-memory samples; the turn text records (name, index, a random draw)."""

    def __init__(self, name: str, size: int, failing: set[int] | None = None) -> None:
        super().__init__(name=name)
        self.size = size
        self.failing = failing or set()

    def __len__(self) -> int:
        return self.size

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        if index in self.failing:
            raise CorruptSampleError(f"/fake/{self.name}/{index}.jpg is corrupt")
        draw = int(rng.integers(1_000_000))
        return RawSample(np.zeros((2, 2, 3), np.uint8), f"/fake/{self.name}/{index}.jpg", self.name,
                         [(f"q {draw}", "a")], [], ["r"], {"no_target": [False]})


def signature(dataset: HybridDataset, count: int = 64) -> list[tuple[str, str]]:
    return [(dataset[i].image_path, dataset[i].turns[0][0]) for i in range(count)]


def make_hybrid(**kwargs) -> HybridDataset:
    sources = {
        "a": FakeDataset("a", 50),
        "b": [FakeDataset("b1", 10), FakeDataset("b2", 1000)],
        "c": FakeDataset("c", 7),
    }
    return HybridDataset(sources, kwargs.pop("rates", [6, 3, 1]), samples_per_epoch=kwargs.pop("n", 200), **kwargs)


def test_sampling_is_reproducible_and_differs_across_ranks_and_epochs() -> None:
    first = signature(make_hybrid(seed=5))
    assert first == signature(make_hybrid(seed=5))
    other_rank = make_hybrid(seed=5)
    other_rank.set_rank(1)
    assert signature(other_rank) != first
    other_epoch = make_hybrid(seed=5)
    other_epoch.set_epoch(1)
    assert signature(other_epoch) != first
    assert signature(make_hybrid(seed=6)) != first
    back = make_hybrid(seed=5)
    back.set_epoch(1)
    back.set_epoch(0)
    assert signature(back) == first


def test_proportions_follow_sample_rates_and_sub_dataset_rule() -> None:
    dataset = make_hybrid(n=4000)
    counts = Counter(dataset.source_names[dataset.draw_source(i)] for i in range(4000))
    for name, rate in zip("abc", [0.6, 0.3, 0.1]):
        assert abs(counts[name] / 4000 - rate) < 0.03
    subs = Counter(dataset[i].dataset for i in range(600))
    assert subs["b1"] > 0.3 * (subs["b1"] + subs["b2"])  # uniform over sub-datasets, not by size
    by_size = make_hybrid(n=600, sub_dataset_weighting="size")
    subs = Counter(by_size[i].dataset for i in range(600))
    assert subs["b1"] < 0.05 * (subs["b1"] + subs["b2"])


def test_rates_validation() -> None:
    with pytest.raises(ValueError, match="2 sample rates for 3 sources"):
        make_hybrid(rates=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        make_hybrid(rates=[1, -1, 1])
    dataset = make_hybrid(rates={"a": 1, "c": 1})
    assert dataset.source_probabilities.tolist() == [0.5, 0.0, 0.5]


def test_corrupt_samples_are_skipped_counted_and_replaced() -> None:
    flaky = FakeDataset("flaky", 4, failing={0, 1, 2})
    dataset = HybridDataset({"x": flaky}, [1], samples_per_epoch=40, seed=1)
    samples = [dataset[i] for i in range(40)]
    assert all(sample.image_path == "/fake/flaky/3.jpg" for sample in samples)
    total = sum(sample.meta["num_skipped"] for sample in samples)
    assert total > 0 and total == dataset.num_skipped
    assert all(len(s.meta["skipped_errors"]) == s.meta["num_skipped"] for s in samples)
    assert any("corrupt" in error for s in samples for error in s.meta["skipped_errors"])
    assert [dataset[i].turns for i in range(40)] == [s.turns for s in samples]  # replacement is deterministic


def test_too_many_failures_raise_a_clear_error() -> None:
    dataset = HybridDataset({"x": FakeDataset("dead", 3, failing={0, 1, 2})}, [1], samples_per_epoch=5,
                            max_consecutive_failures=4)
    with pytest.raises(RuntimeError, match="4 consecutive samples of source 'x' failed"):
        dataset[0]


def test_transform_runs_inside_getitem_and_its_errors_are_skips() -> None:
    calls = []

    def transform(sample: RawSample) -> dict:
        calls.append(sample.image_path)
        if len(calls) == 1:
            raise ValueError("sequence too long")
        return {"path": sample.image_path, "num_skipped": sample.meta["num_skipped"]}

    dataset = HybridDataset({"x": FakeDataset("x", 5)}, [1], samples_per_epoch=3, transform=transform)
    assert dataset[0]["num_skipped"] == 1 and dataset.num_skipped == 1


def test_corrupt_image_file_on_disk_is_replaced(tmp_path: Path) -> None:
    fx.write_reason_seg(tmp_path)
    bad = tmp_path / "reason_seg" / "ReasonSeg" / "val" / "b.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    dataset = HybridDataset({"reason_seg": ReasonSegDataset(str(tmp_path), "val")}, [1], samples_per_epoch=30, seed=2)
    samples = [dataset[i] for i in range(30)]
    assert all(sample.image_path.endswith("c.jpg") for sample in samples)
    assert dataset.num_skipped == sum(s.meta["num_skipped"] for s in samples) > 0
    assert any(str(bad) in error for s in samples for error in s.meta["skipped_errors"])


@pytest.mark.parametrize("length,world", [(0, 2), (1, 3), (10, 1), (10, 3), (17, 4), (5, 8)])
def test_sharded_eval_sampler_covers_each_index_once(length: int, world: int) -> None:
    shards = [list(ShardedEvalSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardedEvalSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]
    with pytest.raises(ValueError):
        ShardedEvalSampler(length, world, world)


def test_cli_string_helpers() -> None:
    assert split_names("sem_seg||refer_seg|| vqa ||") == ["sem_seg", "refer_seg", "vqa"]
    assert parse_sample_rates("9,3,3,1") == [9.0, 3.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_sample_rates("9;3")


def test_build_train_and_val_from_lisa_style_args(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path), seed=0, num_train=6, num_val=3)
    args = argparse.Namespace(
        dataset_dir=str(tmp_path), dataset="sem_seg||refer_seg||vqa||reason_seg", sample_rates="3,3,1,3",
        sem_seg_data="ade20k", refer_seg_data="refcoco||grefcoco", vqa_data="synthetic_vqa",
        reason_seg_data="ReasonSeg|train", num_classes_per_sample=2, explanatory=0.1, seed=7,
        samples_per_epoch=24, unrelated_flag=True,
    )
    dataset = build_train_dataset(args)
    assert len(dataset) == 24 and dataset.source_names == ["sem_seg", "refer_seg", "vqa", "reason_seg"]
    reason = dataset.sources[3][0]
    assert reason.text_only_rate == pytest.approx(0.1) and reason.explanatory_rate == pytest.approx(0.45)
    for index in range(24):
        sample = dataset[index]
        sample.validate()
        assert len(sample.turns) <= 2 or sample.meta["source"] == "vqa"
    override = build_train_dataset(args, dataset="reason_seg", sample_rates="1", explanatory=-1)
    assert override.sources[0][0].text_only_rate == 0 and override.sources[0][0].explanatory_rate == 0
    with pytest.raises(TypeError, match="unknown training-data settings"):
        build_train_dataset(args, not_a_setting=1)
    with pytest.raises(ValueError, match="1 rates for 2 sources"):
        build_train_dataset(args, dataset="vqa||reason_seg", sample_rates="1")
    vals = build_val_datasets("synthetic|val||synthetic|refer_val||refcoco|unc|val", str(tmp_path))
    assert [v.name for v in vals.values()] == ["synthetic_reason_seg", "synthetic_refer", "refcoco"]
    assert all(v.mode == "val" for v in vals.values())


def test_synthetic_names_need_a_synthetic_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="synthetic.json"):
        build_val_dataset("synthetic|val", str(tmp_path))


def test_dataloader_workers_return_skip_counts(tmp_path: Path) -> None:
    import pickle

    import torch

    fx.write_reason_seg(tmp_path)
    (tmp_path / "reason_seg" / "ReasonSeg" / "val" / "b.jpg").write_bytes(b"broken")
    dataset = HybridDataset({"reason_seg": ReasonSegDataset(str(tmp_path), "val")}, [1], samples_per_epoch=12, seed=4)
    pickle.loads(pickle.dumps(dataset))  # workers started with "spawn" receive a pickled copy
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=list)
    in_workers = sum(sample.meta["num_skipped"] for batch in loader for sample in batch)
    assert dataset.num_skipped == 0  # the main process's counter saw none of it
    assert in_workers == sum(dataset[i].meta["num_skipped"] for i in range(12)) > 0


class CountingDataset(FakeDataset):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        self.reads += 1
        return super().get_sample(index, rng)

    def item_path(self, index: int) -> str:
        return f"/fake/{self.name}/{index}.jpg"


def test_check_sources_names_a_dataset_none_of_whose_items_can_be_read() -> None:
    from utils.data import UnreadableSourceError

    flaky = CountingDataset("flaky", 20, failing=set(range(19)))  # one good item: fine
    good = CountingDataset("good", 50)
    HybridDataset({"x": flaky, "y": good}, [1, 1], samples_per_epoch=4).check_sources()
    assert good.reads == 1 and flaky.reads == 8  # stops at the first success; tries 8 spread items
    dead = CountingDataset("dead", 30, failing=set(range(30)))
    mixed = HybridDataset({"x": good, "y": [CountingDataset("fine", 3), dead]}, [1, 1], samples_per_epoch=4)
    with pytest.raises(UnreadableSourceError) as raised:
        mixed.check_sources()
    message = str(raised.value)
    assert "training source 'y'" in message and "dataset 'dead'" in message
    assert "none of the 8 items tried" in message and "/fake/dead/0.jpg" in message
    assert "first error: CorruptSampleError: /fake/dead/0.jpg is corrupt" in message
    assert isinstance(raised.value, ValueError)  # train_ddp.py reports it as a data configuration error
    # A source with rate 0 is never drawn, so it is not read either.
    HybridDataset({"x": good, "y": dead}, [1, 0], samples_per_epoch=4).check_sources()


def test_a_source_in_the_wrong_layout_stops_the_build_with_source_path_and_error(tmp_path: Path) -> None:
    from utils.data import UnreadableSourceError

    write_synthetic_dataset(str(tmp_path), seed=0, num_train=6, num_val=3)
    (tmp_path / "coco" / "train2017").rename(tmp_path / "coco" / "images")  # VQA images where nobody looks
    args = argparse.Namespace(
        dataset_dir=str(tmp_path), dataset="sem_seg||refer_seg||vqa||reason_seg", sample_rates="3,3,1,3",
        sem_seg_data="ade20k", refer_seg_data="refcoco||grefcoco", vqa_data="synthetic_vqa",
        reason_seg_data="ReasonSeg|train", seed=7, samples_per_epoch=24,
    )
    with pytest.raises(UnreadableSourceError) as raised:
        build_train_dataset(args)
    message = str(raised.value)
    assert "training source 'vqa'" in message and "dataset 'synthetic_vqa'" in message
    assert str(tmp_path / "coco" / "train2017") in message  # the path tried
    assert "first error: CorruptSampleError: cannot read image" in message
    # The other sources are fine: without vqa the build succeeds.
    assert build_train_dataset(args, dataset="sem_seg||refer_seg||reason_seg", sample_rates="1,1,1").source_names == [
        "sem_seg", "refer_seg", "reason_seg"]


def test_a_plain_dataset_mixes_in_as_documented():
    """Items that are not RawSamples (a TensorDataset's tuples) carry no meta to annotate."""
    import torch

    dataset = HybridDataset({"plain": torch.utils.data.TensorDataset(torch.arange(10))}, [1], samples_per_epoch=4,
                            max_consecutive_failures=2)
    items = [dataset[i] for i in range(4)]
    assert all(isinstance(item, tuple) and 0 <= int(item[0]) < 10 for item in items) and dataset.num_skipped == 0
