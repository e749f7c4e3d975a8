"""The built-in default, end to end on a CPU: `make demo`.

1. writes the synthetic dataset (coloured shapes, in the real on-disk formats),
2. builds the tiny random segmenter,
3. trains it with `torchrun --nproc_per_node=2 train_ddp.py --config configs/demo_tiny.json`,
4. evaluates the last checkpoint with test.py on the held-out synthetic scenes,
5. merges it with transform_weight.py,
6. asks inference.py about a held-out scene and saves the masks and overlays,

printing the validation gIoU and where the pictures are. Every step runs the real entry point
as a user would; steps whose outputs exist are skipped unless --fresh is given.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.distributed import free_port  # noqa: E402


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("\n$ " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=REPO, env=env, check=True, **kwargs)


def held_out_request(data_dir: Path) -> tuple[Path, str]:
    """The first held-out (validation) scene and its first query, asked as evaluation asks it."""
    from utils.data.templates import segmentation_question

    annotation_file = sorted((data_dir / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))[0]
    annotation = json.loads(annotation_file.read_text())
    question = segmentation_question(annotation["text"][0], annotation["is_sentence"])
    return annotation_file.with_suffix(".jpg"), question


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="where everything is written")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_tiny.json"), help="the training recipe")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    parser.add_argument("--max_steps", type=int, default=0, help="shorter training (0: the recipe's)")
    args = parser.parse_args()
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

    report = out / "eval_report.json"
    run([python, "test.py", "--version", str(runs / "demo"), "--dataset_dir", str(data_dir),
         "--val_dataset", "synthetic|val", "--protocol", "both", "--report", str(report)])
    merged = out / "merged"
    run([python, "transform_weight.py", "--ckpt", str(runs / "demo"), "--out", str(merged), "--precision", "fp32",
         "--overwrite"])
    image, query = held_out_request(data_dir)
    vis = out / "vis"
    run([python, "inference.py", "--version", str(merged), "--image", str(image), "--prompt", query,
         "--vis_save_path", str(vis)])

    print("\n=== demo summary ===")
    for entry in json.loads(report.read_text())["results"]:
        print(f"{entry['split']} ({entry['protocol']}): gIoU {entry['metrics']['giou']:.3f} "
              f"cIoU {entry['metrics']['ciou']:.3f} over {entry['metrics']['count']} masks")
    print(f"training curves: {runs / 'demo' / 'metrics.jsonl'} (TensorBoard: {runs / 'demo' / 'tensorboard'})")
    print(f"merged model: {merged}")
    print(f"held-out scene {image.name}, request {query!r}: masks and overlays in {vis}")


if __name__ == "__main__":
    main()
