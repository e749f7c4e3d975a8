"""Train the reasoning segmenter.

    python train_ddp.py --version DIR --vision_pretrained SAM.pth --dataset_dir dataset ...
    torchrun --nproc_per_node=8 train_ddp.py ...            (NCCL on CUDA, gloo on CPU)
    torchrun ... train_ddp.py --deepspeed configs/ds_zero2.json ...

See `python train_ddp.py --help` and the README. The loop lives in utils/trainer.py.
"""

import logging
import sys

from utils.cli import setup_environment

setup_environment(offline_hub=False)

from utils.train_args import parse_args  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(argv)
    # After parsing: torch takes seconds to import, --help and a wrong flag need none of it.
    from utils.distributed import cleanup_distributed, init_distributed

    dist_info = init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist_info.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {dist_info.rank}] %(levelname)s %(name)s: %(message)s",
    )
    from utils.trainer import Trainer, build_datasets

    train_data, val_data = build_datasets(args, dist_info)  # before the model: a data error stops the run at once
    trainer = Trainer(args, dist_info, train_data, val_data)
    try:
        if args.eval_only:
            scores = trainer.validate()
        else:
            scores = trainer.train()
        if dist_info.is_main and scores:
            print(f"validation {args.val_dataset} (teacher_forced): gIoU {scores['giou']:.4f} cIoU {scores['ciou']:.4f}", flush=True)
    finally:
        trainer.close()
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
