"""--answer_style: "plain" (LISA's answers, unchanged) or "named" (the target named before its [SEG]),
from the templates through every dataset and the builders to the model's config and test.py."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import write_ade20k, write_grefcoco, write_reason_seg, write_refcoco
from model.config import SegmenterConfig
from utils.data import templates
from utils.data.builders import build_source_dataset, build_train_dataset, build_val_dataset
from utils.data.coco_instances import CocoDetectionDataset, CocoInstancesDataset
from utils.data.reason_seg import ReasonSegDataset, read_annotation
from utils.data.sample import CorruptSampleError
from utils.data.refer import GRefCocoDataset, ReferSegDataset
from utils.data.rng import derive_rng
from utils.data.sem_seg import Ade20kDataset
from utils.data.synthetic_writer import write_synthetic_dataset

# --------------------------------------------------------------------------- templates


def test_named_answers_name_the_target_before_its_seg_tokens() -> None:
    assert templates.mask_answer(1, "The Red Square.", "named") == "Sure, it is the red square [SEG]."
    assert templates.mask_answer(3, " the circles ", "named") == "Sure, they are the circles [SEG], [SEG] and [SEG]."
    assert templates.mask_answer(2, "both dogs", "named") == "Sure, they are both dogs [SEG] and [SEG]."
    # One canonical wording: a generator changes nothing.
    assert {templates.mask_answer(1, "the lamp", "named", derive_rng(seed)) for seed in range(10)} == {
        "Sure, it is the lamp [SEG]."}
    assert templates.explanatory_answer(" Because it is red. ", None, "the red square", "named") == (
        "Sure, it is the red square [SEG]. Because it is red.")


def test_no_name_or_plain_style_gives_the_plain_answer() -> None:
    for name in (None, "", "  "):
        assert templates.mask_answer(1, name, "named") == "[SEG]."
    assert templates.mask_answer(2, "the dogs", "plain") == "[SEG] and [SEG]."
    assert templates.explanatory_answer("Because.", None, "the box", "plain") == "[SEG]. Because."
    with pytest.raises(ValueError, match="'plain', 'named'.*'fancy'"):
        templates.mask_answer(1, "x", "fancy")
    with pytest.raises(ValueError, match="'plain', 'named'"):
        ReasonSegDataset("/nowhere", answer_style="Named")  # checked before any file is read


# The answers of the hand-written fixture datasets (every item, seeds 0-5) and of the answer
# functions, computed with the code from before answer_style existed: "plain" must not change a byte.
PLAIN_ANSWERS_SHA256 = "a7d6d73bfcd19360c5fb70a488f6e7a959e6f3a110551f3955db68aeb2363106"


def fixture_datasets(root: Path, **style) -> list:
    write_reason_seg(root)
    write_refcoco(root)
    write_grefcoco(root)
    write_ade20k(root)
    instances = str(root / "refer_seg" / "refcoco" / "instances.json")
    images = str(root / "refer_seg" / "images" / "mscoco" / "images" / "train2014")
    return [
        ReasonSegDataset(str(root), "train", explanatory_rate=0.45, text_only_rate=0.1, **style),
        ReasonSegDataset(str(root), "val", mode="val", val_queries="all", **style),
        ReferSegDataset(str(root), "refcoco", split="train", **style),
        ReferSegDataset(str(root), "refcoco", split="val", mode="val", **style),
        GRefCocoDataset(str(root), split="val", mode="val", **style),
        GRefCocoDataset(str(root), split="val", mode="train", **style),
        Ade20kDataset(str(root), **style),
        Ade20kDataset(str(root), mode="val", **style),
        CocoInstancesDataset(instances, images, **style),
        CocoDetectionDataset(instances, images, **style),
    ]


def all_answers(datasets: list, answer: Callable[[int, np.random.Generator], str]) -> list:
    answers = [
        [reply for _, reply in dataset.get_sample(index, derive_rng(seed, index)).turns]
        for dataset in datasets
        for seed in range(6)
        for index in range(len(dataset))
    ]
    rng = np.random.default_rng(5)
    answers.append([answer(count, rng) for count in (1, 2, 1, 3, 1, 1, 2)])
    answers.append([templates.explanatory_answer("Because.", rng, "the box", datasets[0].answer_style)
                    for _ in range(4)])
    return answers


@pytest.mark.parametrize("style", [{}, {"answer_style": "plain"}])
def test_plain_answers_are_byte_identical_to_lisas(tmp_path: Path, style: dict) -> None:
    datasets = fixture_datasets(tmp_path, **style)
    answers = all_answers(datasets, lambda count, rng: templates.mask_answer(count, "the box", "plain", rng))
    assert hashlib.sha256(json.dumps(answers).encode()).hexdigest() == PLAIN_ANSWERS_SHA256


# --------------------------------------------------------------------------- datasets


def answers_of_item(dataset, index: int) -> list[str]:
    return [reply for _, reply in dataset[index].turns]


def answers_of(dataset) -> list[str]:
    return [reply for index in range(len(dataset)) for reply in answers_of_item(dataset, index)]


def test_named_reason_seg_uses_target_names_else_a_short_request_else_plain(tmp_path: Path) -> None:
    write_reason_seg(tmp_path)
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    (val / "b.jpg").rename(val / "d.jpg")  # d: sentences with target_names; b: without
    (val / "d.json").write_text(json.dumps({
        "text": ["What would you use to sit down?", "", "Where would a cat sleep?"], "is_sentence": True,
        "target_names": [" The Red Chair. ", "unused", None],
        "shapes": [{"label": "target", "points": [[2, 3], [12, 3], [12, 13], [2, 13]]}],
    }))
    (val / "b.jpg").write_bytes((val / "c.jpg").read_bytes())
    annotation = read_annotation(str(val / "d.json"), 30, 40)
    assert annotation.target_names == ["The Red Chair.", None]  # aligned with the non-empty queries
    assert read_annotation(str(val / "b.json"), 30, 40).target_names is None
    named = ReasonSegDataset(str(tmp_path), "val", mode="val", val_queries="all", answer_style="named")
    items = [(Path(named.item_path(i)).stem, *answers_of_item(named, i)) for i in range(len(named))]
    assert items == [
        ("b", "[SEG]."), ("b", "[SEG]."),  # sentences without names: LISA's answer
        ("c", "Sure, it is the lamp [SEG]."),  # a short phrase names itself
        ("d", "Sure, it is the red chair [SEG]."),
        ("d", "[SEG]."),  # a sentence whose name is missing
    ]
    (tmp_path / "e.json").write_text(json.dumps({"text": ["Where?"], "is_sentence": True, "target_names": ["a", "b"],
                                                  "shapes": []}))
    with pytest.raises(CorruptSampleError, match="2 target_names for 1 queries"):
        read_annotation(str(tmp_path / "e.json"), 30, 40)
    plain = ReasonSegDataset(str(tmp_path), "val", mode="val", val_queries="all")
    assert set(answers_of(plain)) == {"[SEG]."}


def test_named_reason_seg_explanations_and_text_answers(tmp_path: Path) -> None:
    write_reason_seg(tmp_path)  # a.jpg: short queries, with an explanation
    explained = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=1.0, text_only_rate=0.0,
                                 answer_style="named")
    sample = explained.get_sample(0, derive_rng(0))
    assert sample.meta["answer_kind"] == "mask+explanation"
    for request, (_, answer) in zip(sample.requests, sample.turns):
        assert answer == f"Sure, it is {request.lower()} [SEG]. The box is big because it is large."
    text_only = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=0.0, text_only_rate=1.0,
                                 answer_style="named")
    assert {a for _, a in text_only.get_sample(0, derive_rng(0)).turns} == {"The box is big because it is large."}


def test_named_refer_sem_seg_and_coco_answers_name_their_request(tmp_path: Path) -> None:
    datasets = fixture_datasets(tmp_path, answer_style="named")
    refer_train = datasets[2].get_sample(0, derive_rng(0))
    assert [a for _, a in refer_train.turns] == [f"Sure, it is {r} [SEG]." for r in refer_train.requests]
    assert answers_of(datasets[3]) == ["Sure, it is crowd [SEG].", "Sure, it is people [SEG]."]
    # gRefCOCO: a multi-target expression names itself; a no-target one keeps its text answer.
    assert answers_of(datasets[4]) == ["Sure, it is both people [SEG].", templates.no_target_answer(),
                                       "Sure, it is right person [SEG]."]
    ade = datasets[7][0]
    assert ade.requests and [a for _, a in ade.turns] == [f"Sure, it is {r} [SEG]." for r in ade.requests]
    categories = datasets[8].get_sample(0, derive_rng(0))
    assert [a for _, a in categories.turns] == [f"Sure, it is {r} [SEG]." for r in categories.requests]
    detection = datasets[9]  # every category of every image, one [SEG] per instance
    assert [(detection[i].requests, answers_of_item(detection, i)) for i in range(len(detection))] == [
        (["person"], ["Sure, it is person [SEG]."]),
        (["dog"], ["Sure, it is dog [SEG]."]),
        (["person"], [templates.no_target_answer()]),  # image 2 has a crowd region only
        (["dog"], [templates.no_target_answer()]),
    ]
    two_people = CocoDetectionDataset(  # gRefCOCO's image: two people
        str(tmp_path / "refer_seg" / "grefcoco" / "instances.json"),
        str(tmp_path / "refer_seg" / "images" / "mscoco" / "images" / "train2014"), answer_style="named",
    )
    assert answers_of(two_people) == ["Sure, they are person [SEG] and [SEG]."]


def test_builders_pass_the_style_to_every_source(tmp_path: Path) -> None:
    write_reason_seg(tmp_path)
    write_refcoco(tmp_path)
    write_ade20k(tmp_path)
    train = build_train_dataset(
        dataset_dir=str(tmp_path), dataset="sem_seg||refer_seg||reason_seg", sample_rates="1,1,1",
        sem_seg_data="ade20k", refer_seg_data="refcoco", answer_style="named", samples_per_epoch=4,
    )
    styles = {dataset.name: dataset.answer_style for group in train.sources for dataset in group}
    assert styles == {"ade20k": "named", "refcoco": "named", "reason_seg": "named"}
    assert build_source_dataset("refer_seg", "refcoco", str(tmp_path)).answer_style == "plain"
    val = build_val_dataset("refcoco|unc|val", str(tmp_path), answer_style="named")
    assert answers_of(val) == ["Sure, it is crowd [SEG].", "Sure, it is people [SEG]."]
    assert build_val_dataset("ReasonSeg|val", str(tmp_path), answer_style="named").answer_style == "named"


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_reason_seg_files_name_each_query_by_its_short_form(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path), seed=2, num_train=12, num_val=6)
    files = sorted((tmp_path / "reason_seg" / "ReasonSeg").glob("*/*.json"))
    assert {f.parent.name for f in files} == {"train", "val", "explanatory"}
    sentences = 0
    for file in files:
        if file.parent.name == "explanatory":
            continue
        content = json.loads(file.read_text())
        assert len(content["target_names"]) == len(content["text"])
        for query, name in zip(content["text"], content["target_names"]):
            if content["is_sentence"]:
                sentences += 1
                # The short form the words give, without the colour-and-kind only looking tells.
                assert name.startswith("the ") and name != query and ("shape" in name or len(name.split()) == 2), name
            else:
                assert name == query
    assert sentences
    val = build_val_dataset("synthetic|val", str(tmp_path), reason_seg_queries="all", answer_style="named")
    for index in range(len(val)):
        sample = val[index]
        content = json.loads(Path(val.item_path(index)).with_suffix(".json").read_text())
        name = content["target_names"][content["text"].index(sample.requests[0])]
        assert sample.turns[0][1] == f"Sure, it is {name.lower()} [SEG]."


# --------------------------------------------------------------------------- model config, flags, test.py


def test_answer_style_flag_round_trips_through_the_saved_config(tmp_path: Path) -> None:
    from utils.train_args import build_parser

    parser = build_parser()
    assert parser.parse_args([]).answer_style == "plain"
    args = parser.parse_args(["--answer_style", "named"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--answer_style", "loud"])
    config = SegmenterConfig("qwen2_5_vl", "tiny", 64, 32, answer_style=args.answer_style)
    config.save_pretrained(tmp_path / "named")
    assert json.loads((tmp_path / "named" / "config.json").read_text())["answer_style"] == "named"
    assert SegmenterConfig.from_pretrained(tmp_path / "named").answer_style == "named"
    old = json.loads((tmp_path / "named" / "config.json").read_text())
    del old["answer_style"]  # a config.json written before the option existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert SegmenterConfig.from_pretrained(tmp_path / "old").answer_style == "plain"


def test_build_model_records_the_answer_style(tiny_vlm_dir, tmp_path: Path) -> None:
    from model.sam import build_sam
    from utils.train_args import build_parser
    from utils.trainer import build_model

    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), tmp_path / "sam_tiny.pth")
    args = build_parser().parse_args([
        "--version", str(tiny_vlm_dir("qwen2_5_vl")), "--vision_pretrained", str(tmp_path / "sam_tiny.pth"),
        "--vision_model", "tiny", "--answer_style", "named",
    ])
    model = build_model(args, None, dtype=torch.float32, device="cpu")
    assert model.config.answer_style == "named"
    model.save_pretrained(tmp_path / "checkpoint", include_sam=False)
    assert SegmenterConfig.from_pretrained(tmp_path / "checkpoint").answer_style == "named"


@pytest.mark.parametrize("style", ["named", "plain"])
def test_test_py_builds_its_splits_in_the_models_answer_style(tmp_path: Path, style: str) -> None:
    from utils.eval_cli import model_and_splits, parse_args

    write_refcoco(tmp_path / "data")
    SegmenterConfig("qwen2_5_vl", "tiny", 64, 32, answer_style=style).save_pretrained(tmp_path / "model")
    args = parse_args(["--version", str(tmp_path / "model"), "--dataset_dir", str(tmp_path / "data"),
                       "--val_dataset", "refcoco|unc|val"])
    (directory, config), splits = model_and_splits(args)
    assert directory == tmp_path / "model" and config.answer_style == style
    expected = ["Sure, it is crowd [SEG].", "Sure, it is people [SEG]."] if style == "named" else ["[SEG].", "[SEG]."]
    assert answers_of(splits["refcoco|unc|val"]) == expected
