"""Every command-line flag of `teaserve`, in one place."""

from __future__ import annotations

import argparse

from .. import __version__
from ..cache import CACHE_BACKEND_ENV, cache_backend_names, parse_config_json
from ..engine import DEFAULT_MAX_QUEUE_SIZE
from ..evaluation.sweeps import CALIBRATION_STEPS, DEFAULT_THRESHOLDS, Variant
from ..pipelines import DTYPE_CHOICES


def _json_object(text: str) -> dict:
    """A JSON object argument, parsed strictly (bad JSON or another JSON type is refused)."""
    try:
        return parse_config_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="auto: bfloat16 on GPU, float32 on CPU")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-backend",
        choices=cache_backend_names(),
        default=None,
        help=f"step-caching method (default: ${CACHE_BACKEND_ENV}, else none)",
    )
    parser.add_argument(
        "--cache-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="cache settings as a JSON object, e.g. '{\"rel_l1_thresh\": 0.2}'",
    )
    _add_device_flags(parser)


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded model)")
    serve.add_argument("--omni", action="store_true", help="accepted for `vllm serve ... --omni` compatibility")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8091)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (env TEASERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="model id reported by /v1/models and accepted")
    serve.add_argument(
        "--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE, help="waiting requests (429 after)"
    )
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (413 above)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_model_flags(serve)


def _add_generate(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate images from the command line")
    generate.add_argument(
        "model_and_prompt", nargs="+", metavar="[MODEL] PROMPT", help="model (default: the embedded one), then prompt"
    )
    generate.add_argument("-o", "--output", default="out.png", help="output file (several images: out-0.png, ...)")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    generate.add_argument("-n", "--num-images", type=int, default=1)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--true-cfg-scale", type=float, default=None)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument("--image", action="append", default=[], help="input image for edit models (repeatable)")
    generate.add_argument("--mask", default=None, help="mask image for inpainting edits")
    generate.add_argument("--layers", type=int, default=None, help="layers for Qwen-Image-Layered")
    generate.add_argument("--resolution", type=int, default=None, help="640 or 1024 for Qwen-Image-Layered")
    generate.add_argument(
        "--request-cache-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="per-request cache overrides, e.g. '{\"rel_l1_thresh\": 0.4}'",
    )
    _add_model_flags(generate)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _variant(text: str) -> Variant:
    name, separator, config = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"a variant looks like NAME=JSON, got {text!r}")
    return Variant(name, _json_object(config))


def _add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """The model and the prompts, seeds and sampling that bench and calibrate run."""
    parser.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded model)")
    parser.add_argument("--prompts", default=None, help="file with one prompt per line (default: built-in prompts)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--true-cfg-scale", type=float, default=None)


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure cached against uncached speed and quality")
    _add_sweep_flags(parser)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--thresholds", type=_floats, default=list(DEFAULT_THRESHOLDS), help="comma-separated")
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=None,
        metavar="NAME=JSON",
        help="server cache settings to sweep the thresholds on, over --cache-config (repeatable; default: those)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="uncached warm-up runs, not counted")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--plot", default=None, help="also draw speedup against PSNR into this PNG")
    _add_model_flags(parser)


def _add_calibrate(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="fit TeaCache's coefficients to a model")
    _add_sweep_flags(parser)
    parser.add_argument(
        "--steps",
        type=_ints,
        default=list(CALIBRATION_STEPS),
        help=f"comma-separated step counts to record and fit over (default: {','.join(map(str, CALIBRATION_STEPS))})",
    )
    parser.add_argument(
        "--validate",
        type=int,
        default=0,
        metavar="N",
        help="check shrinkages of the fit on N further prompts and keep the best (default: off)",
    )
    parser.add_argument("-o", "--output", default="teacache-profile.json", help="where to write the profile")
    _add_device_flags(parser)


def _add_train_default(subparsers) -> None:
    parser = subparsers.add_parser("train-default", help="retrain the embedded shapes model (about 50 CPU minutes)")
    parser.add_argument("--out", required=True, help="folder to write the trained pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="scale every stage's steps (quick trials: 0.05)")
    parser.add_argument("--evaluate", type=int, default=302, help="held-out captions to evaluate on (302 = all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teaserve", description="OpenAI-compatible diffusion server with training-free step caching."
    )
    parser.add_argument("--version", action="version", version=f"teaserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_generate(subparsers)
    _add_bench(subparsers)
    _add_calibrate(subparsers)
    _add_train_default(subparsers)
    return parser
