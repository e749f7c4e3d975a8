"""test.py and the shared evaluation: complete reports, 1 vs 2 processes, protocols, bad input."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import REPO
from utils.distributed import free_port
from utils.eval_report import rescore_predictions
from utils.masks import decode_rle

SPLITS = ["synthetic|val", "synthetic|refer_val", "synthetic|grefer_val"]
PROTOCOLS = ["teacher_forced", "generate"]
METRIC_KEYS = {
    "count", "giou", "ciou", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8", "precision@0.9",
    "box_iou", "box_acc@0.5", "n_acc", "no_target_count", "t_acc", "target_count", "sum_intersection", "sum_union",
}


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_eval")
    subprocess.run(
        [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--seed", "1", "--num_train", "5",
         "--num_val", "12", "--overwrite", "--no_progress"],
        cwd=REPO, check=True, capture_output=True,
    )
    return out


def test_command(model_dir, data_dir, out_dir, *extra, nproc=0):
    launcher = [sys.executable, "test.py"]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "test.py"]
    return [
        *launcher, "--version", str(model_dir), "--dataset_dir", str(data_dir), "--val_dataset", "||".join(SPLITS),
        "--protocol", "both", "--max_new_tokens", "4", "--workers", "0", "--no_progress",
        "--log_dir", str(out_dir), "--save_predictions", str(out_dir / "predictions.jsonl"), *extra,
    ]


test_command.__test__ = False  # a helper, not a test


def run(command, timeout=240):
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_run(tiny_segmenter_dir, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_single")
    result = run(test_command(tiny_segmenter_dir(), synthetic_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((out / "report.json").read_text()), out


def results_by_key(report):
    return {(r["split"], r["protocol"]): r for r in report["results"]}


def test_teacher_forced_and_generated_reports_are_complete(single_run, tiny_segmenter_dir):
    result, report, out = single_run
    assert report["checkpoint"] == str(tiny_segmenter_dir().resolve())
    assert report["model"]["kind"] == "standalone" and report["model"]["vlm_family"] == "qwen2_5_vl"
    assert report["model"]["sam_encoder_compiled"] is False  # --compile_sam auto: off on a CPU
    assert set(report["protocols"]) == set(PROTOCOLS) and "giou" in report["metric_definitions"]
    assert report["run"]["world_size"] == 1 and report["run"]["reason_seg_queries"] == "first"
    results = results_by_key(report)
    assert set(results) == {(s, p) for s in SPLITS for p in PROTOCOLS}
    for (split, protocol), entry in results.items():
        assert entry["complete"] and set(entry["metrics"]) == METRIC_KEYS, (split, protocol)
        counts = entry["counts"]
        assert counts["evaluated_items"] == counts["split_items"] > 0 and counts["unreadable"] == 0
        assert counts["masks"] == entry["metrics"]["count"] >= counts["questions"] - counts["no_target_questions"]
        for key in ("giou", "ciou", "box_iou", "box_acc@0.5", "precision@0.5"):
            assert 0.0 <= entry["metrics"][key] <= 1.0
        assert ("answers" in entry) == (protocol == "generate") == ("detection" in entry)
    # ReasonSeg: first query of each of the 12 images, split into short and long queries.
    for protocol in PROTOCOLS:
        entry = results[("synthetic|val", protocol)]
        assert entry["counts"]["questions"] == entry["counts"]["split_items"] == 12
        groups = entry["groups"]
        assert set(groups) == {"short", "long"}
        assert groups["short"]["count"] + groups["long"]["count"] == 12
        assert groups["short"]["sum_union"] + groups["long"]["sum_union"] == entry["metrics"]["sum_union"]
    assert "groups" not in results[("synthetic|refer_val", "teacher_forced")]
    # gRefCOCO: teacher forcing cannot score the no-target expressions (their given answer has no
    # [SEG]): it leaves them out and says so; generation scores them (N-acc).
    tf, gen = results[("synthetic|grefer_val", "teacher_forced")], results[("synthetic|grefer_val", "generate")]
    assert tf["counts"]["questions"] == 48 and tf["counts"]["no_target_questions"] == 12
    assert tf["counts"]["excluded_no_target"] == 12 and tf["counts"]["masks"] == tf["metrics"]["count"] == 36
    assert tf["metrics"]["no_target_count"] == 0 and tf["metrics"]["n_acc"] is None
    assert gen["counts"]["excluded_no_target"] == 0 and gen["metrics"]["no_target_count"] == 12
    assert all(r["counts"]["excluded_no_target"] == 0 for (split, _), r in results.items() if split != "synthetic|grefer_val")
    answers = gen["answers"]
    assert answers["total"] == 48 and answers["seg_format_rate"] == answers["with_expected_seg"] / 48
    assert gen["metrics"]["n_acc"] is not None
    # The table names the protocol on every row, and the split and its counts.
    table = result.stdout
    assert "protocol" in table.splitlines()[2] and "gIoU" in table and "cIoU" in table and "N-acc" in table
    rows = [line for line in table.splitlines() if line.startswith(("teacher_forced ", "generate "))]
    assert len(rows) == 2 * (3 + 1 + 1)  # synthetic|val has overall, short, long
    assert any("synthetic|grefer_val" in row and " 48 " in row for row in rows)
    excluded_rows = [row for row in rows if "excl*" in row]
    assert len(excluded_rows) == 1 and excluded_rows[0].startswith("teacher_forced") and "synthetic|grefer_val" in excluded_rows[0]
    assert "* teacher_forced synthetic|grefer_val: 12 no-target expressions left out" in table
    assert "protocol teacher_forced:" in table and "protocol generate:" in table
    assert (out / "results.txt").read_text().strip() in table


def test_saved_predictions_are_rle_and_rescore_to_the_report(single_run, synthetic_root):
    _, report, out = single_run
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # One line per scored question (teacher forcing leaves the no-target expressions out).
    assert len(lines) == sum(r["counts"]["questions"] - r["counts"]["excluded_no_target"] for r in report["results"])
    assert not list(out.glob("*.part"))
    first = lines[0]
    assert first["split"] == "synthetic|val" and first["protocol"] == "teacher_forced" and first["index"] == 0
    assert first["answer"] == first["reference_answer"] == "[SEG]." and first["num_seg"] == 1
    image = Image.open(first["image_path"])
    mask = decode_rle(first["pred_masks"][0]["rle"])
    assert mask.shape == (image.height, image.width)
    assert not [l for l in lines if l["no_target"] and l["protocol"] == "teacher_forced"]
    assert len([l for l in lines if l["no_target"] and l["protocol"] == "generate"]) == 12
    rescored = rescore_predictions(out / "predictions.jsonl")
    for key, entry in results_by_key(report).items():
        expected = {**entry["metrics"], **{k: entry[k] for k in ("groups", "detection") if k in entry}}
        assert rescored[key] == expected, key


def test_two_processes_give_the_numbers_of_one(single_run, tiny_segmenter_dir, synthetic_root, tmp_path):
    _, single, single_out = single_run
    result = run(test_command(tiny_segmenter_dir(), synthetic_root, tmp_path, nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((tmp_path / "report.json").read_text())
    assert double["run"]["world_size"] == 2
    a, b = results_by_key(single), results_by_key(double)
    assert a.keys() == b.keys()
    for key in a:
        for field in ("counts", "metrics", "groups", "answers", "detection"):
            assert a[key].get(field) == b[key].get(field), (key, field)
    # Same predictions, in the same order.
    assert (tmp_path / "predictions.jsonl").read_text() == (single_out / "predictions.jsonl").read_text()


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt, SystemExit], ids=["error", "ctrl_c", "sigterm"])
def test_a_failed_run_leaves_no_part_file(tiny_segmenter_dir, synthetic_root, tmp_path, monkeypatch, failure):
    """An error, Ctrl-C or SIGTERM (torchrun stopping the other ranks) mid-evaluation: no
    predictions file, and no part left beside it."""
    import utils.eval_cli
    from utils.evaluation import evaluate

    parts_while_running = []

    def failing_evaluate(*args, on_prediction, **kwargs):
        def write_then_fail(record):
            on_prediction(record)
            parts_while_running.extend(tmp_path.glob("*.part"))
            if failure is SystemExit:  # as torchrun stops the other ranks when one fails
                os.kill(os.getpid(), signal.SIGTERM)
            raise failure("stopped mid-evaluation")

        return evaluate(*args, on_prediction=write_then_fail, **kwargs)

    monkeypatch.setattr(utils.eval_cli, "evaluate", failing_evaluate)
    predictions = tmp_path / "predictions.jsonl"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(failure) as raised:
        utils.eval_cli.main(["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(synthetic_root),
                             "--val_dataset", "synthetic|val", "--max_samples", "2", "--workers", "0",
                             "--no_progress", "--log_dir", str(tmp_path), "--save_predictions", str(predictions)])
    assert parts_while_running == [tmp_path / "predictions.jsonl.rank0.part"]
    assert list(tmp_path.iterdir()) == []
    if failure is SystemExit:
        assert raised.value.code == 128 + signal.SIGTERM  # as a shell reports a process ended by SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def test_a_failed_merge_leaves_neither_parts_nor_a_final_file(tmp_path):
    from utils.eval_report import PredictionWriter

    writer = PredictionWriter(tmp_path / "predictions.jsonl", rank=0)
    writer.sink("synthetic|val")({"protocol": "teacher_forced", "index": 0, "turn": 0})
    (tmp_path / "predictions.jsonl.rank1.part").write_text("{not json\n")  # rank 1's part, unreadable
    with pytest.raises(json.JSONDecodeError):
        writer.merge(world_size=2)
    assert list(tmp_path.iterdir()) == []


class ForcedAnswer(LogitsProcessor):
    """Greedy decoding produces a scripted answer; finds where each generate call starts."""

    def __init__(self, token_ids):
        self.token_ids = token_ids
        self.previous = None
        self.start = 0

    def __call__(self, input_ids, scores):
        p = self.previous
        continued = p is not None and input_ids.shape == (p.shape[0], p.shape[1] + 1) and torch.equal(input_ids[:, :-1], p)
        if not continued:
            self.start = input_ids.shape[1]
        self.previous = input_ids.clone()
        forced = self.token_ids[min(input_ids.shape[1] - self.start, len(self.token_ids) - 1)]
        scores = torch.full_like(scores, -1e9)
        scores[:, forced] = 0
        return scores


def forced(model, answer):
    tokenizer = model.processor.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return {"logits_processor": LogitsProcessorList([ForcedAnswer(ids)])}


@pytest.fixture(scope="module")
def tiny_model(tiny_segmenter_dir):
    from model.loading import load_segmenter

    # One thread: these many small steps only lose to thread synchronisation on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_segmenter(tiny_segmenter_dir(), precision="fp32", device="cpu")
    torch.set_num_threads(threads)


def test_generated_reference_answer_scores_like_teacher_forcing(tiny_model, synthetic_root):
    from utils.data.builders import build_val_dataset
    from utils.evaluation import GENERATE, evaluate, evaluate_teacher_forced

    data = torch.utils.data.Subset(build_val_dataset("synthetic|refer_val", str(synthetic_root)), range(6))
    reference = evaluate_teacher_forced(tiny_model, data, show_progress=False)
    records = []
    same = evaluate(tiny_model, data, GENERATE, batch_size=3, show_progress=False, max_new_tokens=8,
                    generate_kwargs=forced(tiny_model, "[SEG]."), on_prediction=records.append)
    assert same["seg_format_rate"] == 1.0 and same["answers_with_expected_seg"] == 6
    for key in ("count", "sum_intersection", "sum_union", "giou", "ciou", "box_iou"):
        assert same[key] == pytest.approx(reference[key], abs=1e-9), key
    assert [r["answer"] for r in records] == ["[SEG]."] * 6 and all(r["num_seg"] == 1 for r in records)
    # A second [SEG] is not scored (the first has the same state), but the format is wrong.
    extra = evaluate(tiny_model, data, GENERATE, show_progress=False, max_new_tokens=8,
                     generate_kwargs=forced(tiny_model, "[SEG] and [SEG]."))
    assert extra["seg_format_rate"] == 0.0 and extra["count"] == 6
    assert extra["sum_intersection"] == reference["sum_intersection"]
    # No [SEG] at all: every target gets an empty mask.
    none = evaluate(tiny_model, data, GENERATE, show_progress=False, max_new_tokens=8,
                    generate_kwargs=forced(tiny_model, "It is a shape."))
    assert none["sum_intersection"] == 0 and none["giou"] == 0.0 and none["t_acc"] == 0.0
    assert none["seg_format_rate"] == 0.0 and none["count"] == 6 and none["sum_union"] > 0


def test_no_target_answer_under_generation(tiny_model, synthetic_root):
    from utils.data.builders import build_val_dataset
    from utils.evaluation import GENERATE, evaluate

    data = torch.utils.data.Subset(build_val_dataset("synthetic|grefer_val", str(synthetic_root)), range(12))
    no_target = [data[i].meta["no_target"][0] for i in range(len(data))]
    n = sum(no_target)
    assert 0 < n < 12
    scores = evaluate(tiny_model, data, GENERATE, batch_size=4, show_progress=False, max_new_tokens=12,
                      generate_kwargs=forced(tiny_model, "There is no such object in this image."))
    # Every answer says "no target": right for the no-target expressions (IoU 1), empty masks elsewhere.
    assert (scores["count"], scores["no_target_count"], scores["target_count"]) == (12, n, 12 - n)
    assert scores["n_acc"] == 1.0 and scores["t_acc"] == 0.0
    assert scores["giou"] == pytest.approx(n / 12, abs=1e-12) and scores["sum_intersection"] == 0
    assert scores["seg_format_rate"] == n / 12
    # Answered with a (non-empty) mask instead, the no-target expressions are wrong.
    with_masks = evaluate(tiny_model, data, GENERATE, batch_size=4, show_progress=False, max_new_tokens=8,
                          generate_kwargs=forced(tiny_model, "[SEG]."))
    assert with_masks["no_target_count"] == n and with_masks["n_acc"] == 0.0
    assert with_masks["seg_format_rate"] == (12 - n) / 12


def test_mask_less_model_scores_zero_teacher_forced_on_grefcoco(tiny_model, synthetic_root, monkeypatch):
    """A model that never outputs a mask used to get gIoU 0.25 and N-acc 1.0 here from the
    no-target expressions alone; teacher forcing now leaves them out: gIoU 0 and no N-acc."""
    from utils.data.builders import build_val_dataset
    from utils.evaluation import evaluate_teacher_forced

    monkeypatch.setattr(tiny_model, "decode_masks", lambda _embeddings, states, _input_sizes, original_sizes: [
        torch.full((len(image_states), *size), -1.0) for image_states, size in zip(states, original_sizes)])
    data = build_val_dataset("synthetic|grefer_val", str(synthetic_root))
    n = sum(data[i].meta["no_target"][0] for i in range(len(data)))
    assert 0 < n < len(data) == 48
    scores = evaluate_teacher_forced(tiny_model, data, batch_size=4, show_progress=False)
    assert scores["giou"] == 0.0 and scores["ciou"] == 0.0 and scores["t_acc"] == 0.0
    assert scores["n_acc"] is None and scores["no_target_count"] == 0
    assert scores["count"] == len(data) - n and scores["excluded_no_target"] == scores["no_target_questions"] == n
    assert scores["questions"] == len(data)


# --------------------------------------------------------------------------- bad input


def main_error(argv) -> str:
    from utils.eval_cli import main

    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code not in (0, None)
    return str(raised.value.code)


def test_unknown_split_lists_what_exists(tiny_segmenter_dir, synthetic_root, tmp_path):
    base = ["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(synthetic_root), "--log_dir", str(tmp_path)]
    message = main_error(base + ["--val_dataset", "refcoco|unc|nosuch"])
    assert "nosuch" in message and "splits found: ['train', 'val']" in message
    message = main_error(base + ["--val_dataset", "synthetic|val||synthetic|nope"])
    assert "synthetic|refer_val" in message and "synthetic|grefer_val" in message
    message = main_error(base + ["--val_dataset", "ReasonSeg|test"])
    assert "found in" in message and "val" in message
    # As users run it: a message and a non-zero status, no traceback.
    result = run([sys.executable, "test.py", *base, "--val_dataset", "refcoco|unc|nosuch"], timeout=120)
    assert result.returncode != 0 and "splits found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_empty_split_is_an_error(tiny_segmenter_dir, tmp_path):
    folder = tmp_path / "data" / "reason_seg" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.jpg")
    (folder / "a.json").write_text(json.dumps({"text": [], "is_sentence": False, "shapes": []}))
    message = main_error(["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(tmp_path / "data"),
                          "--val_dataset", "ReasonSeg|val", "--log_dir", str(tmp_path)])
    assert "'ReasonSeg|val'" in message and "is empty" in message


def test_an_inconsistent_index_file_is_named_not_a_traceback(tiny_segmenter_dir, synthetic_root, tmp_path):
    """gRefCOCO refs naming an image that instances.json lacks: the split and the file are named."""
    source = synthetic_root / "refer_seg"
    (tmp_path / "data" / "refer_seg" / "grefcoco").mkdir(parents=True)
    (tmp_path / "data" / "refer_seg" / "images").symlink_to(source / "images")
    shutil.copy(source / "grefcoco" / "grefs(unc).json", tmp_path / "data" / "refer_seg" / "grefcoco")
    instances = json.loads((source / "grefcoco" / "instances.json").read_text())
    refs = json.loads((source / "grefcoco" / "grefs(unc).json").read_text())
    missing = next(ref["image_id"] for ref in refs if ref["split"] == "val")
    instances["images"] = [image for image in instances["images"] if image["id"] != missing]
    (tmp_path / "data" / "refer_seg" / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    message = main_error(["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(tmp_path / "data"),
                          "--val_dataset", "grefcoco|unc|val", "--log_dir", str(tmp_path)])
    assert message.startswith("error: split 'grefcoco|unc|val'") and "instances.json" in message
    assert "1 images named by refs are missing" in message


def test_checkpoint_problems_are_named(tiny_segmenter_dir, tiny_vlm_dir, synthetic_root, tmp_path):
    from model.segmenter import ReasonSegmenter
    from model.vlm import LoraSettings

    base = ["--dataset_dir", str(synthetic_root), "--val_dataset", "synthetic|val", "--max_samples", "2",
            "--workers", "0", "--no_progress", "--log_dir", str(tmp_path)]
    headless = tmp_path / "headless"
    shutil.copytree(tiny_segmenter_dir(), headless)
    (headless / "head.safetensors").unlink()
    message = main_error(["--version", str(headless), *base])
    assert "head.safetensors" in message and "segmentation head" in message

    # A training checkpoint (LoRA adapter) of a Qwen2.5-VL, given a Qwen2-VL as base model.
    torch.manual_seed(0)
    adapter = tmp_path / "adapter_checkpoint"
    ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", lora=LoraSettings()).save_pretrained(adapter)
    message = main_error(["--version", str(adapter), "--base_model", str(tiny_vlm_dir("qwen2_vl")), *base])
    assert "qwen2_5_vl" in message and "qwen2_vl" in message and "trained on" in message
    # ... or a Qwen2.5-VL of another size.
    from model.tiny import save_tiny_vlm

    other_size = save_tiny_vlm(tmp_path / "vlm_hidden_32", "qwen2_5_vl", hidden_size=32)
    message = main_error(["--version", str(adapter), "--base_model", str(other_size), *base])
    assert "hidden size 64" in message and "hidden size 32" in message

    # With its own base model it loads and scores (a partial run, flagged as such).
    from utils.eval_cli import main

    argv = ["--version", str(adapter), "--base_model", str(tiny_vlm_dir("qwen2_5_vl")), *base,
            "--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["kind"] == "adapter" and report["model"]["base_model"] == str(tiny_vlm_dir("qwen2_5_vl"))
    entry = report["results"][0]
    assert entry["protocol"] == "teacher_forced" and not entry["complete"]
    assert entry["counts"]["evaluated_items"] == 2 and entry["counts"]["split_items"] == 12
    assert (tmp_path / "results.txt").is_file()  # the table goes beside --report
    assert shlex.split(report["run"]["command"]) == ["test.py", *argv]  # pastes back into a shell as run


def test_unreadable_items_make_a_split_incomplete_and_are_named_under_the_table():
    from utils.eval_report import format_table, result_entry

    scores = {"count": 5, "giou": 0.5, "ciou": 0.5, "unreadable": 1, "questions": 5, "no_target_questions": 0,
              "excluded_no_target": 0}
    entry = result_entry("ReasonSeg|val", "teacher_forced", scores, split_items=6, evaluated_items=6)
    assert not entry["complete"]  # every item was read for, but one could not be: not the whole split
    row = [line for line in format_table([entry]).splitlines() if line.startswith("teacher_forced")][0]
    assert " 5/6 " in row
    whole = result_entry("ReasonSeg|val", "teacher_forced", {**scores, "unreadable": 0}, 6, 6)
    assert whole["complete"]


# --------------------------------------------------------------------------- no-target expressions


def no_target_indices(data):
    flags = [bool(data[i].meta["no_target"][0]) for i in range(len(data))]
    return [i for i, flag in enumerate(flags) if flag], [i for i, flag in enumerate(flags) if not flag]


def test_teacher_forcing_runs_no_forward_for_no_target_expressions(tiny_model, synthetic_root, monkeypatch):
    from utils.data.builders import build_val_dataset
    from utils.evaluation import evaluate_teacher_forced

    data = build_val_dataset("synthetic|grefer_val", str(synthetic_root))
    absent, present = no_target_indices(data)
    # Batches of 4: the first has no-target expressions only (no batch left to run), the second is mixed.
    order = absent[:4] + present[:2] + absent[4:6] + present[2:6]
    forwarded = []
    forward = tiny_model.forward

    def counting_forward(batch):
        forwarded.append([extra["meta"]["no_target"] for extra in batch["extra"]])
        return forward(batch)

    monkeypatch.setattr(tiny_model, "forward", counting_forward)
    scores = evaluate_teacher_forced(tiny_model, torch.utils.data.Subset(data, order), batch_size=4, show_progress=False)
    assert len(forwarded) == 2  # the batch of no-target expressions only never reached the model
    assert sorted(flags for batch in forwarded for flags in batch) == [[False]] * 6
    # Counted as before: every item and question, the no-target ones left out of the scores.
    assert (scores["items"], scores["questions"], scores["unreadable"]) == (12, 12, 0)
    assert scores["no_target_questions"] == scores["excluded_no_target"] == 6
    assert scores["count"] == 6 and scores["no_target_count"] == 0 and scores["n_acc"] is None
    # The scores are those of the items with a target alone (one item per batch: the same forwards).
    forwarded.clear()
    mixed = evaluate_teacher_forced(tiny_model, torch.utils.data.Subset(data, order), show_progress=False)
    alone = evaluate_teacher_forced(tiny_model, torch.utils.data.Subset(data, present[:6]), show_progress=False)
    assert len(forwarded) == 12
    for key in ("count", "sum_intersection", "sum_union", "giou", "ciou", "box_iou", "precision@0.5", "t_acc"):
        assert mixed[key] == alone[key], key
    assert {k: mixed[k] for k in ("items", "questions", "excluded_no_target")} == {
        k: scores[k] for k in ("items", "questions", "excluded_no_target")}


def test_a_split_teacher_forcing_cannot_score_is_an_error_alone(tiny_model, synthetic_root):
    from utils.data.builders import build_val_dataset
    from utils.evaluation import NothingScoredError, evaluate_teacher_forced

    data = build_val_dataset("synthetic|grefer_val", str(synthetic_root))
    absent, _ = no_target_indices(data)
    with pytest.raises(NothingScoredError) as raised:
        evaluate_teacher_forced(tiny_model, torch.utils.data.Subset(data, absent[:3]), show_progress=False)
    assert "3 no-target expressions left out" in str(raised.value) and "generate" in str(raised.value)
    counts = raised.value.counts
    assert (counts["items"], counts["questions"], counts["excluded_no_target"], counts["unreadable"]) == (3, 3, 3, 0)


@pytest.fixture(scope="module")
def no_target_split_root(synthetic_root, tmp_path_factory):
    """A dataset directory whose gRefCOCO split ``absent`` has no-target expressions only (those of
    the synthetic val split); ``val`` is the synthetic val split."""
    root = tmp_path_factory.mktemp("no_target_split")
    source = synthetic_root / "refer_seg"
    (root / "refer_seg" / "grefcoco").mkdir(parents=True)
    (root / "refer_seg" / "images").symlink_to(source / "images")
    (root / "refer_seg" / "grefcoco" / "instances.json").symlink_to(source / "grefcoco" / "instances.json")
    refs = json.loads((source / "grefcoco" / "grefs(unc).json").read_text())
    copies = [{**ref, "split": "absent", "ref_id": len(refs) + k}
              for k, ref in enumerate(r for r in refs if r["split"] == "val" and r["no_target"])]
    assert len(copies) == 12
    (root / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs + copies))
    return root


def no_target_argv(model_dir, data_dir, out_dir, protocol="both"):
    return ["--version", str(model_dir), "--dataset_dir", str(data_dir), "--val_dataset",
            "grefcoco|unc|absent||grefcoco|unc|val", "--protocol", protocol, "--max_samples", "6",
            "--max_new_tokens", "4", "--workers", "0", "--no_progress", "--report", str(out_dir / "report.json")]


def test_both_protocols_report_a_split_teacher_forcing_cannot_score(tiny_segmenter_dir, no_target_split_root, tmp_path):
    from utils.eval_cli import main

    said = []
    assert main(no_target_argv(tiny_segmenter_dir(), no_target_split_root, tmp_path), say=said.append) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    results = results_by_key(report)
    assert list(results) == [(s, p) for s in ("grefcoco|unc|absent", "grefcoco|unc|val") for p in PROTOCOLS]
    unscored = results[("grefcoco|unc|absent", "teacher_forced")]
    assert unscored["metrics"] == {} and "6 of 6 questions are no-target" in unscored["not_scored"]
    assert unscored["counts"]["excluded_no_target"] == unscored["counts"]["questions"] == 6
    assert unscored["counts"]["masks"] == 0 and unscored["counts"]["evaluated_items"] == 6
    # Generation scores the same split (N-acc), and the run went on to the next split.
    generated = results[("grefcoco|unc|absent", "generate")]
    assert "not_scored" not in generated and generated["metrics"]["no_target_count"] == 6
    assert generated["metrics"]["n_acc"] is not None
    assert all("not_scored" not in results[("grefcoco|unc|val", p)] for p in PROTOCOLS)
    assert results[("grefcoco|unc|val", "teacher_forced")]["metrics"]["count"] > 0
    # The table says it, with no score on the row (6 of the 12 items read, 0 masks), and why under it.
    table = said[0]
    rows = [line.split() for line in table.splitlines() if line.startswith("teacher_forced  grefcoco|unc|absent")]
    assert rows == [["teacher_forced", "grefcoco|unc|absent", "NOT", "SCORED*", "6/12", "0", *["-"] * 12]]
    assert "* teacher_forced grefcoco|unc|absent: NOT SCORED, nothing to score: 6 of 6 questions" in table
    # One protocol alone: nothing to score is an error, as before.
    message = main_error(no_target_argv(tiny_segmenter_dir(), no_target_split_root, tmp_path, "teacher_forced"))
    assert "grefcoco|unc|absent" in message and "no mask was scored" in message and "6 no-target" in message


def test_both_protocols_on_two_processes_report_the_unscored_split_alike(
    tiny_segmenter_dir, no_target_split_root, tmp_path
):
    from utils.eval_cli import main

    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    assert main(no_target_argv(tiny_segmenter_dir(), no_target_split_root, single), say=lambda _: None) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "test.py", *no_target_argv(tiny_segmenter_dir(), no_target_split_root, double)]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    a = results_by_key(json.loads((single / "report.json").read_text()))
    b = results_by_key(json.loads((double / "report.json").read_text()))
    assert a.keys() == b.keys() and a[("grefcoco|unc|absent", "teacher_forced")]["not_scored"]
    for key in a:
        for field in ("not_scored", "counts", "metrics", "answers", "detection"):
            assert a[key].get(field) == b[key].get(field), (key, field)
