"""VAN Studio's Gradio app: ``python app.py [--model SOURCE]`` (Hugging Face Spaces runs this file)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

from van_app.ui import build_demo, launch_options


def main() -> None:
    """Parse the command line, build the page and serve it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("VAN_MODEL"),
                        help="anything load_model accepts (variant, checkpoint, export dir, Hub repo id); "
                             "default: $VAN_MODEL, else the bundled export under checkpoints/")
    parser.add_argument("--local-models", action=argparse.BooleanOptionalAction,
                        default=not os.environ.get("SPACE_ID"),
                        help="let visitors load models from this machine's files by path, and variants with random "
                             "weights; off, they choose among the startup model, official pretrained weights and Hub "
                             "repos of bounded size (default: on, except on a Hugging Face Space, which sets $SPACE_ID)")
    args = parser.parse_args()
    # The page draws no figures, and gradio asks matplotlib for its backend around every event: a fixed one spares
    # the first visitor the import of pyplot (about 0.3 s).
    matplotlib.use("agg")
    build_demo(args.model, root=Path(__file__).resolve().parent,
               allow_local=args.local_models).launch(**launch_options())


if __name__ == "__main__":
    main()
