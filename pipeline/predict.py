"""Entry point: `python -m pipeline.predict run=<export dir> images=<file or folder> [topk=3] [backend=onnx|onnx-int8]
[csv=FILE] [batch_size=32] [cam=true] [cam_dir=DIR]` (or `make predict RUN=... IMAGES=... [CAM=true]`).

Prints the top-k classes (with probabilities) per image and writes them to a CSV (ship/batch_predict.py). `images`
may be given more than once. `cam=true` also writes a Grad-CAM overlay of each image's top class into `cam_dir`
(default: `<csv stem>_cam/` beside the CSV; giving `cam_dir` turns it on). Like `pipeline.load`, this imports no
Hydra and no training code.
"""
from __future__ import annotations

import logging
import sys

from pipeline.errors import ConfigError, check_choice, exit_on_user_error
from pipeline.runtime import owned
from pipeline.runtime.cli import positive_int, require, split_args
from pipeline.ship.batch_predict import run

OWN_KEYS = {"run": None, "images": None, "backend": "torch", "topk": 3, "csv": None, "batch_size": 32,
            "cam": "false", "cam_dir": None}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error():
        own, extra = split_args([a for a in argv if not a.startswith("images=")], OWN_KEYS, prog="predict")
        images = [a.split("=", 1)[1] for a in argv if a.startswith("images=")]
        if extra:
            raise ConfigError(f"predict: unknown argument(s) {extra}; it takes {', '.join(f'{k}=' for k in OWN_KEYS)}")
        export_dir = require(own, "run", prog="predict", example="run=outputs/runs/<run>/export")
        if not any(images):
            raise ConfigError("predict needs images=...: e.g. images=photos/ (a file or folder; may repeat)")
        check_choice("cam", str(own["cam"]).lower(), ("true", "false"))
        if own["csv"]:  # a CSV of the user's is never overwritten
            owned.prepare_output_file(own["csv"], "choose another csv=... (a new file)")
        run(export_dir, images, backend=own["backend"], topk=positive_int(own, "topk", prog="predict"),
            csv_path=own["csv"], batch_size=positive_int(own, "batch_size", prog="predict"),
            cam=str(own["cam"]).lower() == "true", cam_dir=own["cam_dir"] or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
