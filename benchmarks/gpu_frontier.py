"""Every registered cache backend on a Qwen-Image-size transformer: the speed frontier, on one GPU, unattended.

The transformer alone (no text encoder, no VAE): a QwenImageTransformer2DModel of Qwen-Image's size (diffusers'
defaults: 60 layers, 24 heads of 128, joint_attention_dim 3584, in_channels 64) with random bfloat16 weights, or a
real checkpoint (`--checkpoint`), denoises a 1024x1024 image (4096 image tokens, 256 text tokens of random prompt
embeddings) in 50 flow-matching Euler steps with true CFG: a conditional and an unconditional call per step, each
inside the transformer's `cache_context`, as the Qwen-Image pipeline makes them.

For every backend in teaserve.cache.CACHE_BACKENDS, applied through the public cache API (`apply` on an object
with `.transformer`, `begin_request`, `set_step`, `stats`, `remove`):
- gate overhead: its slowest valid setting that skips nothing (a tiny tuning value) against uncached, per step;
- at two of its tuning_values: block-stack evaluations, ideal speedup (uncached evaluations / these), realized
  speedup (uncached seconds / these, same run), their ratio, and how far the final latents moved.
Random weights time the machinery truthfully but say nothing about quality: skip decisions on them are arbitrary.

A backend that fails is reported with its error. A time budget (default 450 s from start) stops the run between
measurements, or inside one still running when it is spent (reported as that backend's error). The uncached
reference is measured again at the end when there is time (drift). One JSON document goes to stdout (and to
`--out`), progress to stderr.

    python benchmarks/gpu_frontier.py                   # H200: about 6-8 minutes
    python benchmarks/gpu_frontier.py --checkpoint /models/Qwen-Image
    python benchmarks/gpu_frontier.py --smoke           # the same code on a tiny transformer, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

BUDGET_SECONDS = 450.0
"""Stop starting new measurements after this; a full run must end within 8 minutes."""
NEVER_SKIP_VALUES = (1e-12, 1e-9, 1e-6, 0)
"""Tuning values tried, in order, for a setting that runs the gate but never skips (the first one a backend
accepts). Larger tuning values are faster, so a tiny one is the slowest."""


@dataclass(frozen=True)
class Workload:
    image_side: int
    """Latent tokens per side: 1024 px / 8 (VAE) / 2 (patch) = 64."""
    text_tokens: int
    steps: int
    overhead_steps: int
    true_cfg_scale: float
    device: torch.device
    dtype: torch.dtype

    @property
    def image_tokens(self) -> int:
        return self.image_side * self.image_side


SMOKE_CONFIG = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "in_channels": 16,
    "out_channels": 4,
    "axes_dims_rope": (4, 6, 6),
}


def log(message: str) -> None:
    print(f"[gpu_frontier] {message}", file=sys.stderr, flush=True)


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 600 else text[:597] + "..."


def build_transformer(checkpoint: str | None, smoke: bool, workload: Workload):
    from diffusers import QwenImageTransformer2DModel

    if checkpoint is not None:
        folder = Path(checkpoint)
        subfolder = "transformer" if (folder / "transformer").is_dir() else None
        model = QwenImageTransformer2DModel.from_pretrained(folder, subfolder=subfolder, torch_dtype=workload.dtype)
        return model.to(workload.device).eval(), str(folder)
    torch.manual_seed(0)
    # Built on the device in float32 (random init is fast there), then cast parameter by parameter.
    with workload.device:
        model = QwenImageTransformer2DModel(**(SMOKE_CONFIG if smoke else {}))
    model = model.to(workload.dtype).eval()
    if workload.device.type == "cuda":
        torch.cuda.empty_cache()
    return model, "random"


def flow_sigmas(steps: int, image_tokens: int) -> list[float]:
    """Qwen-Image's schedule: linear sigmas, exponentially time-shifted by mu from the image sequence length
    (base 256 -> 0.5, 8192 -> 0.9), then 0."""
    mu = 0.5 + (0.9 - 0.5) * (image_tokens - 256) / (8192 - 256)
    sigmas = [1.0 - index * (1.0 - 1.0 / steps) / max(steps - 1, 1) for index in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0)) for sigma in sigmas] + [0.0]


class Denoiser:
    """The denoising loop of a Qwen-Image pipeline with true CFG, on fixed random inputs."""

    def __init__(self, transformer, workload: Workload):
        self.transformer, self.workload = transformer, workload
        config = transformer.config
        generator = torch.Generator("cpu").manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(workload.device, workload.dtype)

        self.noise = randn(1, workload.image_tokens, config.in_channels)
        self.prompt = randn(1, workload.text_tokens, config.joint_attention_dim)
        self.negative_prompt = randn(1, workload.text_tokens, config.joint_attention_dim)
        self.img_shapes = [[(1, workload.image_side, workload.image_side)]]

    def synchronize(self) -> None:
        if self.workload.device.type == "cuda":
            torch.cuda.synchronize(self.workload.device)

    def _predict(self, latents, timestep, prompt):
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=prompt,
            encoder_hidden_states_mask=None,  # all tokens valid: what the pipeline passes then
            img_shapes=self.img_shapes,
            return_dict=False,
        )[0]

    @torch.inference_mode()
    def run(
        self, steps: int, backend=None, overrides: dict[str, Any] | None = None, *, deadline: float | None = None
    ) -> tuple[float, torch.Tensor]:
        """(seconds, final latents) of one request of `steps` steps, told to `backend` as the engine tells it; a
        TimeoutError when it is still running at `deadline` (time.monotonic)."""
        if backend is not None:
            backend.begin_request(steps, overrides)
        sigmas = flow_sigmas(steps, self.workload.image_tokens)
        self.synchronize()
        started = time.perf_counter()
        latents = self.noise
        for index in range(steps):
            timestep = torch.full((1,), sigmas[index], device=latents.device, dtype=latents.dtype)
            with self.transformer.cache_context("cond"):
                cond = self._predict(latents, timestep, self.prompt)
            with self.transformer.cache_context("uncond"):
                uncond = self._predict(latents, timestep, self.negative_prompt)
            combined = uncond + self.workload.true_cfg_scale * (cond - uncond)
            prediction = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
            latents = (latents.float() + (sigmas[index + 1] - sigmas[index]) * prediction.float()).to(latents.dtype)
            if backend is not None:
                backend.set_step(index + 1)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the time budget ran out after {index + 1} of {steps} steps")
        # What a diffusers pipeline does when it ends: stateful cache hooks start over.
        self.transformer._reset_stateful_cache()
        self.synchronize()
        return time.perf_counter() - started, latents


def stack_evaluations(stats: dict[str, Any] | None, calls: int) -> float:
    """Block-stack evaluations of a request, all branches: fractional where the backend counts blocks (a skipped
    step that still runs some blocks), else its computed steps; every call when it reports nothing."""
    if not stats or not stats.get("enabled", True):
        return float(calls)
    if "block_evaluations" in stats and stats.get("num_blocks"):
        return stats["block_evaluations"] / stats["num_blocks"]
    return float(stats["computed_steps"])


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    return float((latents.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


class Budget:
    def __init__(self, seconds: float):
        self.started, self.seconds = time.monotonic(), seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def allows(self, estimate: float) -> bool:
        return self.elapsed + estimate <= self.seconds


def never_skip_overrides(backend) -> dict[str, Any] | None:
    for value in NEVER_SKIP_VALUES:
        try:
            return backend.check_overrides({backend.tuning_key: value})
        except ValueError:
            continue
    return None


def chosen_tuning_values(values: tuple[float, ...]) -> list[float]:
    """Two of the backend's sweep: a moderate and a fast one (the second and the fourth of five)."""
    picked = [values[len(values) // 4], values[(3 * len(values)) // 4]] if values else []
    return sorted(set(picked))


def configured_backend(name: str, transformer):
    """The backend with the model's recommended settings (its cache target's defaults), as the engine builds it."""
    from teaserve.cache import CACHE_BACKENDS, cache_target_for

    backend_class = CACHE_BACKENDS[name]
    defaults = cache_target_for(transformer).defaults.get(name)
    return backend_class.from_config(backend_class.merge_settings(dict(defaults or {}), None))


def measure_backend(
    name: str, denoiser: Denoiser, baseline: dict[str, Any], reference: torch.Tensor, budget: Budget
) -> dict[str, Any]:
    from teaserve.cache import CACHE_BACKENDS

    workload = denoiser.workload
    backend_class = CACHE_BACKENDS[name]
    result: dict[str, Any] = {
        "tuning_key": backend_class.tuning_key,
        "tuning_values": list(backend_class.tuning_values),
    }
    if backend_class.tuning_key is None:
        result["note"] = "no tuning key: nothing to sweep (the uncached reference is this)"
        return result
    per_step = baseline["seconds_per_step"]
    values = chosen_tuning_values(backend_class.tuning_values)
    needed = per_step * (workload.overhead_steps + workload.steps * len(values) + 2) * 1.3
    if not budget.allows(needed):
        result["skipped"] = f"time budget: needs about {needed:.0f} s, {budget.seconds - budget.elapsed:.0f} s left"
        return result
    pipeline = SimpleNamespace(transformer=denoiser.transformer)
    backend = None
    try:
        backend = configured_backend(name, denoiser.transformer)
        result["settings"] = backend.settings
        backend.apply(pipeline)
        if workload.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(workload.device)

        overrides = never_skip_overrides(backend)
        if overrides is None:
            result["gate_overhead"] = {"error": f"none of {list(NEVER_SKIP_VALUES)} is a valid tuning value"}
        else:
            seconds, _ = denoiser.run(workload.overhead_steps, backend, overrides, deadline=budget.deadline)
            stats = backend.stats() or {}
            seconds_per_step = seconds / workload.overhead_steps
            result["gate_overhead"] = {
                "overrides": overrides,
                "steps": workload.overhead_steps,
                "seconds_per_step": seconds_per_step,
                "overhead": seconds_per_step / per_step - 1.0,
                "skipped_steps": stats.get("skipped_steps"),
            }

        result["runs"] = []
        for value in values:
            if not budget.allows(per_step * workload.steps * 1.3):
                result["stopped"] = "time budget"
                break
            seconds, latents = denoiser.run(
                workload.steps, backend, {backend.tuning_key: value}, deadline=budget.deadline
            )
            stats = backend.stats() or {}
            evaluations = stack_evaluations(stats, 2 * workload.steps)
            ideal = baseline["stack_evaluations"] / evaluations if evaluations else None
            realized = baseline["seconds"] / seconds
            result["runs"].append(
                {
                    backend.tuning_key: value,
                    "seconds": seconds,
                    "seconds_per_step": seconds / workload.steps,
                    "computed_steps": stats.get("computed_steps"),
                    "skipped_steps": stats.get("skipped_steps"),
                    "stack_evaluations": evaluations,
                    "ideal_speedup": ideal,
                    "realized_speedup": realized,
                    "realized_over_ideal": realized / ideal if ideal else None,
                    "latent_relative_error": relative_error(latents, reference),
                    "schedules": {
                        branch: data.get("schedule") for branch, data in (stats.get("branches") or {}).items()
                    },
                }
            )
        if workload.device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(workload.device) / 2**30
    except Exception as error:  # one backend's failure is a result, not the end of the run
        result["error"] = error_text(error)
        log(f"{name} failed: {result['error']}")
    finally:
        if backend is not None:
            try:
                backend.remove(pipeline)
            except Exception as error:
                result["remove_error"] = error_text(error)
        if workload.device.type == "cuda":
            torch.cuda.empty_cache()
    # Removing a backend must give back the uncached transformer: the next one is measured on it.
    try:
        _, latents = denoiser.run(2)
        result["restored"] = bool(torch.equal(latents, baseline["two_step_latents"]))
    except Exception as error:
        result["restored"] = False
        result["restore_error"] = error_text(error)
    return result


def environment(workload: Workload) -> dict[str, Any]:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(workload.device)}
    if workload.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(workload.device)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.budget_seconds)
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared CPU
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    workload = Workload(
        image_side=8 if args.smoke else args.image_side,
        text_tokens=8 if args.smoke else args.text_tokens,
        steps=8 if args.smoke else args.steps,
        overhead_steps=4 if args.smoke else args.overhead_steps,
        true_cfg_scale=4.0,
        device=device,
        dtype=torch.float32 if args.smoke else torch.bfloat16,
    )
    document: dict[str, Any] = {
        "workload": {
            "image_tokens": workload.image_tokens,
            "text_tokens": workload.text_tokens,
            "steps": workload.steps,
            "overhead_steps": workload.overhead_steps,
            "cfg": "true CFG: a conditional and an unconditional transformer call per step",
            "true_cfg_scale": workload.true_cfg_scale,
            "dtype": str(workload.dtype).removeprefix("torch."),
            "smoke": args.smoke,
        },
        "environment": environment(workload),
        "budget_seconds": budget.seconds,
        "backends": {},
    }
    import teaserve.pipelines  # noqa: F401  (registers the model families' cache targets)
    from teaserve.cache import CACHE_BACKENDS

    transformer, weights = build_transformer(args.checkpoint, args.smoke, workload)
    document["model"] = {
        "class": type(transformer).__name__,
        "weights": weights,
        "config": {key: value for key, value in transformer.config.items() if not key.startswith("_")},
        "parameters": sum(parameter.numel() for parameter in transformer.parameters()),
        "build_seconds": budget.elapsed,
    }
    denoiser = Denoiser(transformer, workload)
    log(f"model ready after {budget.elapsed:.0f} s; warming up")
    denoiser.run(2)  # kernels chosen, memory pools grown
    _, two_step_latents = denoiser.run(2)
    seconds, reference = denoiser.run(workload.steps)
    baseline = {
        "seconds": seconds,
        "seconds_per_step": seconds / workload.steps,
        "stack_evaluations": 2 * workload.steps,
        "two_step_latents": two_step_latents,
    }
    document["uncached"] = {key: value for key, value in baseline.items() if key != "two_step_latents"}
    log(f"uncached: {seconds:.2f} s for {workload.steps} steps")
    for name in sorted(CACHE_BACKENDS):  # whatever is registered when this runs
        log(f"{name} ({budget.elapsed:.0f} s elapsed)")
        result = document["backends"][name] = measure_backend(name, denoiser, baseline, reference, budget)
        speedups = [
            f"{run['ideal_speedup'] or 0:.2f}x ideal, {run['realized_speedup']:.2f}x" for run in result.get("runs", [])
        ]
        log(f"{name}: {'; '.join(speedups) or result.get('error') or result.get('skipped') or result.get('note')}")
    # The reference again, when there is time: how much the device's speed drifted over the run.
    if budget.allows(baseline["seconds"] * 1.3):
        seconds, _ = denoiser.run(workload.steps)
        document["uncached_again"] = {"seconds": seconds, "drift": seconds / baseline["seconds"] - 1.0}
    document["elapsed_seconds"] = budget.elapsed
    document["stopped_early"] = any(
        "skipped" in result or "stopped" in result for result in document["backends"].values()
    )
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny transformer on the CPU: checks the script")
    parser.add_argument("--checkpoint", help="a Qwen-Image folder or its transformer folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--overhead-steps", type=int, default=10, help="steps of the gate-overhead run")
    parser.add_argument("--image-side", type=int, default=64, help="latent tokens per side (64: 1024x1024 pixels)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS)
    parser.add_argument("--device", help="default: cuda when there is one (cpu with --smoke)")
    parser.add_argument("--out", help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    try:
        document = run(args)
        status = 0
    except Exception as error:  # a failure before the backends (model, baseline) is reported the same way
        document = {"error": error_text(error)}
        status = 1
    text = json.dumps(document, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
