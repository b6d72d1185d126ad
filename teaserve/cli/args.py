"""Every command-line flag of `teaserve`, in one place (the engine's own come from `EngineArgs.add_cli_args`)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..engine import EngineArgs, OmniDiffusionSamplingParams
from ..engine.args import flag_of, json_object_arg
from ..engine.params import parse_size, values_from_strings
from ..evaluation.sweeps import CALIBRATION_STEPS, QUALITY_LEVELS_DB, Variant
from ..server.videos.store import DATA_DIR_ENV

PROFILE_AND_DEVICE = ("cache_profile", "device", "dtype")
"""The engine settings that bench reads (calibrate: the device ones)."""

SAMPLING_FLAGS = {"num_inference_steps": ("--steps",), "num_outputs_per_prompt": ("-n", "--num-images")}
"""Short flags of sampling parameters; the others are --field-name."""

SAMPLING_FLAGS_APART = ("width", "height", "cache_config", "model_knobs")
"""Sampling parameters with flags of their own: --size, --request-cache-config, --model-param."""


def _model_param(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"a model parameter looks like NAME=VALUE, got {text!r}")
    return name, value


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every field of the sampling-parameter schema; values are checked by the schema itself."""
    group = parser.add_argument_group("sampling (default: the model's)")
    for name, spec in OmniDiffusionSamplingParams.model_fields.items():
        if name not in SAMPLING_FLAGS_APART:
            flags = SAMPLING_FLAGS.get(name, (flag_of(name),))
            metavar = flags[-1].lstrip("-").replace("-", "_").upper()
            group.add_argument(*flags, dest=name, metavar=metavar, help=spec.description)
    group.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    group.add_argument(
        "--request-cache-config",
        type=json_object_arg,
        default=None,
        metavar="JSON",
        help="per-request cache overrides, e.g. '{\"rel_l1_thresh\": 0.4}'",
    )
    group.add_argument(
        "--model-param",
        type=_model_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter the model's family declares as its own (VALUE: JSON or text); repeatable",
    )


def sampling_params(args: argparse.Namespace) -> OmniDiffusionSamplingParams:
    """The sampling parameters given on the command line (see `_add_sampling_flags`)."""
    schema = OmniDiffusionSamplingParams
    given = {name: getattr(args, name) for name in schema.model_fields if name not in SAMPLING_FLAGS_APART}
    width, height = parse_size(args.size) if args.size else (None, None)
    return schema(
        **values_from_strings(schema, {name: text for name, text in given.items() if text is not None}),
        width=width,
        height=height,
        cache_config=args.request_cache_config,
        model_knobs={**values_from_strings(schema, dict(args.model_param)), **video_knobs(args)},
    )


def video_knobs(args: argparse.Namespace) -> dict[str, int]:
    """The video flags of `teaserve generate` given, as the model parameters they set."""
    flags = {"num_frames": getattr(args, "num_frames", None), "fps": getattr(args, "fps", None)}
    return {name: value for name, value in flags.items() if value is not None}


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded model)")
    serve.add_argument("--omni", action="store_true", help="accepted for `vllm serve ... --omni` compatibility")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8091)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (env TEASERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="model id reported by /v1/models and accepted")
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (413 above)")
    serve.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds a client has to send its request body (408 after)"
    )
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="seconds the running request may go without finishing a step before /ready fails",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds the running request may take to finish after SIGTERM (a second SIGTERM exits at once)",
    )
    serve.add_argument(
        "--data-dir",
        default=None,
        help="where a video model keeps its jobs (videos.db) and their files, kept across restarts; one server per "
        f"folder (default: ${DATA_DIR_ENV}, else $XDG_DATA_HOME/teaserve or ~/.local/share/teaserve)",
    )
    serve.add_argument(
        "--playground",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the playground page at / (default; --no-playground: the API alone)",
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    EngineArgs.add_cli_args(serve)
    _add_scale_flags(serve)


SCALE_FLAGS = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus", "ray_address")
"""The flags that only mean something with --ray."""


def _add_scale_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("scale-out on Ray Serve (pip install 'teaserve[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: the same API in front of --replicas engine replicas, each owning one device "
        "(one GPU where the cluster has GPUs)",
    )
    group.add_argument(
        "--replicas", type=int, default=None, help="engine replicas (default 1; with autoscaling: at start)"
    )
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default 1)")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas (turns it on)")
    group.add_argument(
        "--replica-cpus", type=float, default=None, help="CPUs each replica reserves, and its torch threads (default 1)"
    )
    group.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="GPUs each replica reserves (default: 1 where the cluster has GPUs, else 0; 0.5 packs two on one GPU)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to deploy on, e.g. auto (the one `ray start` began here) or HOST:PORT (default: start "
        "a Ray instance for this machine alone, listening on loopback only)",
    )


def _add_generate(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate images or videos from the command line")
    generate.add_argument(
        "model_and_prompt", nargs="+", metavar="[MODEL] PROMPT", help="model (default: the embedded one), then prompt"
    )
    generate.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file (default out.png, or out.mp4 for video models; a video may also be .gif or .webp; "
        "several outputs: out-0.png, ...)",
    )
    generate.add_argument(
        "--image", action="append", default=[], help="input image for edit and image-to-video models (repeatable)"
    )
    generate.add_argument("--num-frames", type=int, default=None, help="frames per video (video models)")
    generate.add_argument("--fps", type=int, default=None, help="frames per second of the video (video models)")
    generate.add_argument("--mask", default=None, help="mask image for inpainting edits")
    _add_sampling_flags(generate)
    EngineArgs.add_cli_args(generate)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _variant(text: str) -> Variant:
    label, separator, rest = text.partition("=")
    backend, colon, config = rest.partition(":")
    if not separator or not label or not colon or not backend or backend.lstrip().startswith("{"):
        raise argparse.ArgumentTypeError(
            f'a variant looks like LABEL=BACKEND:JSON, e.g. \'qwen-coefficients=tea_cache:{{"coefficients": '
            f"[-450, 280, -45, 3.2, -0.02]}}', got {text!r}"
        )
    return Variant(label, backend.strip(), json_object_arg(config))


def _values(text: str) -> tuple[str, list[float]]:
    name, separator, values = text.partition("=")
    try:
        parsed = _floats(values)
    except ValueError:
        parsed = []
    if not separator or not name.strip() or not parsed:
        raise argparse.ArgumentTypeError(f"values look like BACKEND=V1,V2,..., e.g. tea_cache=0.2,0.4, got {text!r}")
    return name.strip(), parsed


def _add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """The model and the prompts, seeds and sampling that bench and calibrate run."""
    parser.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded model)")
    parser.add_argument("--prompts", default=None, help="file with one prompt per line (default: built-in prompts)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--true-cfg-scale", type=float, default=None)


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="compare cache backends against uncached: speed and quality, side by side in one run"
    )
    _add_sweep_flags(parser)
    parser.add_argument(
        "--steps", type=_ints, default=[], help="comma-separated denoising step counts (default: the model's)"
    )
    parser.add_argument(
        "--backends",
        type=_names,
        default=None,
        help="comma-separated cache backends to compare (default: every one with a tuning key that works on the "
        "model, unless --variant is given)",
    )
    parser.add_argument(
        "--values",
        type=_values,
        action="append",
        default=[],
        metavar="BACKEND=V1,V2",
        help="the tuning values to sweep for a backend (repeatable; default: the backend's own)",
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="LABEL=BACKEND:JSON",
        help="a labelled set of server settings of a backend to sweep too, over the model's and --cache-profile's "
        "(repeatable)",
    )
    parser.add_argument(
        "--quality-targets",
        type=_floats,
        default=list(QUALITY_LEVELS_DB),
        metavar="DB,DB",
        help="quality targets (mean PSNR dB) to request where a backend has a quality table; '' for none "
        f"(default: {','.join(f'{level:g}' for level in QUALITY_LEVELS_DB)})",
    )
    parser.add_argument("--warmup", type=int, default=1, help="uncached warm-up runs, not counted")
    parser.add_argument("--json", default=None, help="also write rows and frontiers as JSON here")
    parser.add_argument("--plot", default=None, help="also draw every frontier (one panel per step count) to this PNG")
    EngineArgs.add_cli_args(parser, only=PROFILE_AND_DEVICE)


def _add_calibrate(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit cache backends to a model and measure their quality tables into one profile"
    )
    _add_sweep_flags(parser)
    parser.add_argument(
        "--backend",
        type=_names,
        default=None,
        metavar="NAME[,NAME...]",
        help="the cache backends to calibrate (default: every one with a tuning key that works on the model)",
    )
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
        help="compare a backend's candidate fits (TeaCache: shrinkages of its polynomial) on N further prompts and "
        "keep the best (default: off)",
    )
    parser.add_argument("-o", "--output", default="cache-profile.json", help="where to write the profile")
    EngineArgs.add_cli_args(parser, only=("device", "dtype"))


def _add_train_default(subparsers) -> None:
    parser = subparsers.add_parser("train-default", help="retrain the embedded shapes model (about 50 CPU minutes)")
    parser.add_argument("--out", required=True, help="folder to write the trained pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="scale every stage's steps (quick trials: 0.05)")
    parser.add_argument("--evaluate", type=int, default=302, help="held-out captions to evaluate on (302 = all)")


def _add_train_default_video(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-default-video", help="retrain the embedded video model teaserve/shapes-wan (about an hour of CPU)"
    )
    parser.add_argument("--out", required=True, help="folder to write the trained pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="scale every stage's steps (quick trials: 0.05)")
    parser.add_argument("--evaluate", type=int, default=67, help="held-out captions to evaluate on (67 = all)")
    parser.add_argument(
        "--calibration-prompts",
        type=int,
        default=8,
        help="training captions to calibrate TeaCache on (and half as many more to validate its fit on)",
    )


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
    _add_train_default_video(subparsers)
    return parser
