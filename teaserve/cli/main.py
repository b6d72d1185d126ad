"""The `teaserve` command."""

from __future__ import annotations

import logging
import sys

from .args import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "warning").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    quiet_libraries()
    if args.command == "serve":
        from .serve import run
    elif args.command == "generate":
        from .generate import run
    elif args.command == "bench":
        from .bench import run
    elif args.command == "calibrate":
        from .calibrate import run
    elif args.command == "train-default":
        from .train_default import run
    elif args.command == "train-default-video":
        from .train_default_video import run
    try:
        return run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"teaserve {args.command}: error: {error}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Hide the loaders' per-component progress bars; teaserve reports its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
