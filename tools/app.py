"""The Gradio demo: an image and a request in; masks, boxes and the answer out.

    python tools/app.py --version MODEL_DIR                 # http://127.0.0.1:7860
    python tools/app.py --version MODEL_DIR --host 0.0.0.0 --port 8000
    python tools/app.py --version MODEL_DIR --share         # a public gradio.live link

MODEL_DIR is a merged directory from transform_weight.py (or a training checkpoint / run
directory, as in inference.py). Example photographs come from tools/examples/.
"""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the script's own directory is tools/, not the repository

from utils.cli import setup_environment, setup_logging  # noqa: E402

setup_environment()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from utils.gradio_app import build_demo, cache_schedule, examples_in  # noqa: E402
from utils.inference_cli import add_session_arguments, check_session_arguments, session_from_args  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--max_file_size", default="20mb", help="upload size limit (default 20mb)")
    parser.add_argument("--queue_size", type=int, default=16, help="requests that may wait in the queue (default 16)")
    parser.add_argument(
        "--cache_max_age", type=int, default=3600,
        help="delete each request's files (upload, overlay, JSON answer) once they are this many seconds old "
        "(default 3600; all of them when the server stops)",
    )
    parser.add_argument("--examples", default=str(REPO / "tools" / "examples"), help="directory of example photographs")
    args = parser.parse_args()
    check_session_arguments(args, parser)
    try:
        cache_schedule(args.cache_max_age)
    except ValueError as err:
        parser.error(str(err))
    setup_logging()
    session = session_from_args(args)
    from model.sam_compile import image_encoder_is_compiled  # torch: not for --help and flag errors

    examples = examples_in(args.examples)
    # Compile now, not on the first visitor's request: the decoding step and (--compile_sam, by
    # default on CUDA) SAM's image encoder, as the session resolved them.
    if session.decoding == "compiled" or image_encoder_is_compiled(session.model.sam.image_encoder):
        for image, prompt in examples:
            logging.info("warmed up on %s in %.1f s", image, session.warm_up(image, prompt))
    demo = build_demo(session, Path(args.version).name, examples, queue_size=args.queue_size, cache_max_age=args.cache_max_age)
    # SIGTERM (systemd, docker stop) ends the server as Ctrl-C does: Gradio then deletes the
    # request files it holds and the answers' folder goes at exit; the default action would kill
    # the process and leave them on disk.
    signal.signal(signal.SIGTERM, _interrupt)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        ssr_mode=False,
        show_error=False,
    )


if __name__ == "__main__":
    main()
