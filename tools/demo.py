"""The built-in default, end to end on a CPU: `make demo`.

1. writes the synthetic dataset (coloured shapes, in the real on-disk formats),
2. builds the tiny random segmenter,
3. trains it with `torchrun --nproc_per_node=2 train_ddp.py --config configs/demo_tiny.json`,
4. evaluates the last checkpoint with test.py on the held-out synthetic scenes (saving every
   prediction) and draws demo_out/summary.png (the first 8 held-out requests: image, request,
   ground-truth outline, predicted mask and box, IoU) and demo_out/curve.png (training loss and
   validation gIoU by step; tools/demo_figures.py),
5. merges it with transform_weight.py,
6. asks inference.py about a held-out scene whose answer is obvious to the eye ("the red square")
   and saves the masks and overlays,

printing the held-out gIoU and where the pictures are. Every step runs the real entry point
as a user would; steps whose outputs exist are skipped unless --fresh is given.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tools.demo_figures import SUMMARY_COUNT, draw_curve, draw_summary  # noqa: E402
from utils.data.synthetic import COLOURS, SHAPE_KINDS  # noqa: E402
from utils.distributed import free_port  # noqa: E402


#: Seconds each step of this run took (the entry point's name -> wall time), for the summary.
STEP_SECONDS: dict[str, float] = {}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("\n$ " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, check=True, **kwargs)
    step = next(Path(part).name for part in command[1:] if part.endswith(".py"))
    STEP_SECONDS[step] = STEP_SECONDS.get(step, 0.0) + time.perf_counter() - start
    return result


#: A request whose answer anyone can check by eye: a colour and a shape ("the red square").
OBVIOUS_REQUEST = re.compile(r"^(?:the )?(?P<colour>{colours}) (?P<kind>{kinds})$".format(
    colours="|".join(COLOURS), kinds="|".join(SHAPE_KINDS)))


def shape_colours(image: np.ndarray, min_pixels: int = 200, tolerance: int = 40) -> list[str]:
    """The synthetic colours a scene image shows (at least ``min_pixels`` pixels within
    ``tolerance`` of the colour on every channel: JPEG noise and anti-aliased edges do not count)."""
    pixels = image.reshape(-1, 3).astype(np.int16)
    return [name for name, rgb in COLOURS.items()
            if int((np.abs(pixels - np.array(rgb, np.int16)).max(axis=1) <= tolerance).sum()) >= min_pixels]


def held_out_request(data_dir: Path) -> tuple[Path, str, str]:
    """The demo's last request: ``(image, question, request)`` on a held-out (validation) scene,
    chosen by a fixed rule so that its answer is obvious to the eye: the first scene (in file name
    order) showing at least two shapes with a query naming a colour and a shape ("the red square"),
    asked as evaluation asks it. Falls back to the first such query on any scene, then to the first
    scene's first query."""
    from PIL import Image

    from utils.data.templates import segmentation_question

    files = sorted((data_dir / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no held-out scene under {data_dir / 'reason_seg' / 'ReasonSeg' / 'val'}")
    fallback = None
    for annotation_file in files:
        texts = json.loads(annotation_file.read_text())["text"]
        obvious = [OBVIOUS_REQUEST.match(text.strip().lower()) for text in texts]
        match = next((m for m in obvious if m), None)
        if match is None:
            continue
        request = f"the {match['colour']} {match['kind']}"
        image = annotation_file.with_suffix(".jpg")
        fallback = fallback or (image, request)
        with Image.open(image) as handle:
            if len(shape_colours(np.asarray(handle.convert("RGB")))) >= 2:
                return image, segmentation_question(request, False), request
    if fallback is not None:
        return fallback[0], segmentation_question(fallback[1], False), fallback[1]
    annotation = json.loads(files[0].read_text())
    request = annotation["text"][0]
    return files[0].with_suffix(".jpg"), segmentation_question(request, annotation["is_sentence"]), request


def headline(results: list[dict], summary_png: Path, curve_png: Path) -> str:
    """The demo's last line: how good the model is (held-out gIoU when it answers freely) and where
    the pictures are."""
    generated = next((e for e in results if e["protocol"] == "generate"), results[0])
    return (f"held-out gIoU {generated['metrics']['giou']:.3f} ({generated['protocol']}: the model answers freely) "
            f"over {generated['counts']['questions']} requests of {generated['split']}; "
            f"pictures: {summary_png} ({SUMMARY_COUNT} held-out requests), {curve_png} (loss and gIoU by step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="where everything is written")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_tiny.json"), help="the training recipe")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    parser.add_argument("--max_steps", type=int, default=0, help="shorter training (0: the recipe's)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    data_dir, model_dir, runs = out / "data", out / "tiny_model", out / "runs"

    if not (data_dir / "synthetic.json").is_file():
        run([python, "tools/make_synthetic.py", "--out", str(data_dir), "--seed", "0", "--num_train", "2000",
             "--num_val", "100", "--overwrite", "--no_progress"])
    if not (model_dir / "config.json").is_file():
        run([python, "tools/make_tiny_model.py", "--out", str(model_dir)])

    train = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
             str(free_port()), "train_ddp.py", "--config", args.config, "--version", str(model_dir),
             "--dataset_dir", str(data_dir), "--log_base_dir", str(runs), "--exp_name", "demo", "--auto_resume"]
    if args.max_steps:
        train += ["--max_steps", str(args.max_steps)]
    run(train)

    report, predictions = out / "eval_report.json", out / "predictions.jsonl"
    run([python, "test.py", "--version", str(runs / "demo"), "--dataset_dir", str(data_dir),
         "--val_dataset", "synthetic|val", "--protocol", "both", "--report", str(report),
         "--save_predictions", str(predictions)])
    summary_png = draw_summary(predictions, out / "summary.png", image_root=data_dir)
    metrics = runs / "demo" / "metrics.jsonl"
    curve_png = draw_curve(metrics, out / "curve.png", title="The demo's training run")
    merged = out / "merged"
    run([python, "transform_weight.py", "--ckpt", str(runs / "demo"), "--out", str(merged), "--precision", "fp32",
         "--overwrite"])
    image, query, request = held_out_request(data_dir)
    vis = out / "vis"
    run([python, "inference.py", "--version", str(merged), "--image", str(image), "--prompt", query,
         "--vis_save_path", str(vis)])

    results = json.loads(report.read_text())["results"]
    print("\n=== demo summary ===")
    for entry in results:
        print(f"{entry['split']} ({entry['protocol']}): gIoU {entry['metrics']['giou']:.3f} "
              f"cIoU {entry['metrics']['ciou']:.3f} over {entry['metrics']['count']} masks")
    print(f"training curves: {metrics} (TensorBoard: {runs / 'demo' / 'tensorboard'})")
    print(f"merged model: {merged}")
    if STEP_SECONDS:
        print(f"time: {time.perf_counter() - start:.0f} s in all; "
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in STEP_SECONDS.items()))
    print(f"held-out scene {image.name}, request {query!r}: the mask should cover {request} alone; "
          f"masks and overlays in {vis}")
    print(headline(results, summary_png, curve_png))


if __name__ == "__main__":
    main()
