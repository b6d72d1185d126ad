"""Cache backends against uncached, side by side in one run, on the same prompts and seeds.

For every step count and every prompt x seed, the uncached image comes first, made with the 'none' backend swapped
in (no hooks at all: the honest baseline), then each variant's images at each of its settings, with its backend
swapped in, all on the same loaded model. Interleaving per prompt spreads any drift of the machine's speed over
every variant alike. Speed is the ratio of summed times measured in this run; quality is the PSNR (float64) and
SSIM of each image against its uncached twin. Uncached images may come from a `References` store filled before
(calibration records them once for every backend).

Each variant's rows at one step count, with the uncached point (1.0, the PSNR cap), give its frontier: the
envelope of the (speedup, mean PSNR) points no other point beats on both; `Frontier.speedup_at` reads off it the
speedup at a given quality.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import CacheBackend, NoCache
from ..cache.base import QUALITY_TARGET
from ..engine import AsyncEngine, OmniDiffusionSamplingParams, RequestOutput
from .metrics import PSNR_CAP_DB, Media, psnr, ssim
from .prompts import Checker
from .sweeps import QUALITY_LEVELS_DB, Variant

UNCACHED = "uncached"
TARGET_SLACK_DB = 1.0
"""A quality-target row meets its target when its mean PSNR is at most this much below it (the table was
measured on other prompts)."""


@dataclass
class BenchRow:
    variant: str
    backend: str
    steps: int
    setting: dict[str, float]
    """The requests' cache settings: {} uncached, {tuning_key: value} or {"quality_target": dB}."""
    requests: int
    block_stack_evaluations: float
    """Mean per request, all CFG branches together."""
    seconds: float
    transformer_seconds: float | None
    speedup: float
    """End-to-end: uncached seconds / these seconds, summed over the same requests."""
    transformer_speedup: float | None
    ideal_speedup: float
    """Uncached block-stack evaluations / these: what a free gate and free skips would give."""
    psnr_mean: float
    psnr_min: float
    ssim_mean: float
    caption_accuracy: float | None = None
    meets_target: bool | None = None
    """Quality-target rows: whether the mean PSNR is within TARGET_SLACK_DB of the target."""

    @property
    def label(self) -> str:
        """The setting in a few characters: "-" uncached, the tuning value, or the target in dB."""
        if not self.setting:
            return "-"
        if QUALITY_TARGET in self.setting:
            return f"{self.setting[QUALITY_TARGET]:g} dB"
        return f"{next(iter(self.setting.values())):g}"

    @property
    def realized_over_ideal(self) -> float:
        return self.speedup / self.ideal_speedup

    @property
    def transformer_realized_over_ideal(self) -> float | None:
        return None if self.transformer_speedup is None else self.transformer_speedup / self.ideal_speedup


def block_stack_evaluations(output: RequestOutput) -> float:
    """Whole block stacks evaluated; a method that runs part of the stack on a cached step (DBCache's first
    blocks) reports its block evaluations, counted here in stacks."""
    cache = output.metrics.cache
    if cache and cache.get("enabled"):
        if "block_evaluations" in cache and cache.get("num_blocks"):
            return cache["block_evaluations"] / cache["num_blocks"]
        return cache["computed_steps"]
    return output.metrics.transformer_calls


def media_of(output: RequestOutput) -> list[Media]:
    """What a request made: its images, or the frames of each of its videos."""
    return [video.frames for video in output.videos] if output.videos else list(output.images)


@dataclass
class _Totals:
    requests: int = 0
    evaluations: float = 0.0
    seconds: float = 0.0
    transformer_seconds: float = 0.0
    psnrs: list[float] = field(default_factory=list)
    ssims: list[float] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)

    def add(self, output: RequestOutput, reference: RequestOutput | None, checker: Checker | None) -> None:
        self.requests += 1
        self.evaluations += block_stack_evaluations(output)
        self.seconds += output.metrics.seconds
        self.transformer_seconds += output.metrics.transformer_seconds or 0.0
        references = None if reference is None else media_of(reference)
        for index, media in enumerate(media_of(output)):
            if references is not None:
                self.psnrs.append(psnr(media, references[index]))
                self.ssims.append(ssim(media, references[index]))
            if checker is not None:
                self.passes.append(bool(checker(output.prompt, media)))

    def row(self, variant: str, backend: str, steps: int, setting: dict[str, float], uncached: _Totals) -> BenchRow:
        profiled = uncached.transformer_seconds > 0 and self.transformer_seconds > 0
        target = setting.get(QUALITY_TARGET)
        psnr_mean = float(np.mean(self.psnrs)) if self.psnrs else PSNR_CAP_DB
        return BenchRow(
            variant=variant,
            backend=backend,
            steps=steps,
            setting=setting,
            requests=self.requests,
            block_stack_evaluations=self.evaluations / self.requests,
            seconds=self.seconds,
            transformer_seconds=self.transformer_seconds if profiled else None,
            speedup=uncached.seconds / self.seconds,
            transformer_speedup=uncached.transformer_seconds / self.transformer_seconds if profiled else None,
            ideal_speedup=uncached.evaluations / self.evaluations,
            psnr_mean=psnr_mean,
            psnr_min=float(np.min(self.psnrs)) if self.psnrs else PSNR_CAP_DB,
            ssim_mean=float(np.mean(self.ssims)) if self.ssims else 1.0,
            caption_accuracy=float(np.mean(self.passes)) if self.passes else None,
            meets_target=None if target is None else psnr_mean >= target - TARGET_SLACK_DB,
        )


class References:
    """Uncached outputs by (prompt, seed, step count), for one set of sampling parameters: each is generated once
    and shared by every sweep that compares against it."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, int, int], RequestOutput] = {}

    def get(self, engine: AsyncEngine, prompt: str, seed: int, params: OmniDiffusionSamplingParams) -> RequestOutput:
        """The stored output, or a new one from `engine` as it is (the caller swaps the 'none' backend in)."""
        key = (prompt, seed, engine.steps(params))
        if key not in self.outputs:
            self.outputs[key] = generate(engine, prompt, params.replace(seed=seed))
        return self.outputs[key]


def generate(engine: AsyncEngine, prompt: str, params: OmniDiffusionSamplingParams) -> RequestOutput:
    return engine.submit(engine.prepare(prompt, params), block=True).result()


@dataclass
class _Plan:
    """A variant ready to run: its backend (built once) and the request settings it is measured at."""

    variant: Variant
    backend: CacheBackend
    settings: list[dict[str, float]]


def _plan(
    engine: AsyncEngine, variant: Variant, values: Mapping[str, Sequence[float]], quality_targets: Sequence[float]
) -> _Plan:
    backend = engine.create_cache_backend(variant.backend, variant.settings)
    key = backend.tuning_key
    if key is None:
        raise ValueError(f"variant {variant.label!r}: the {backend.name!r} cache backend has no tuning key to sweep")
    settings: list[dict[str, float]] = [{key: value} for value in values.get(backend.name, backend.tuning_values)]
    if backend.quality.table is not None:
        settings += [{QUALITY_TARGET: target} for target in quality_targets]
    for setting in settings:  # refuse bad values before the long run
        backend.check_overrides(setting)
    return _Plan(variant, backend, settings)


def run_bench(
    engine: AsyncEngine,
    prompts: Sequence[str],
    seeds: Sequence[int],
    step_counts: Sequence[int],
    variants: Sequence[Variant],
    *,
    values: Mapping[str, Sequence[float]] | None = None,
    quality_targets: Sequence[float] = (),
    params: OmniDiffusionSamplingParams | None = None,
    checker: Checker | None = None,
    warmup: int = 1,
    references: References | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[BenchRow]:
    """Every prompt x seed uncached and with every variant at every setting, at every step count; one row per
    (step count, variant, setting), the uncached one first at each step count.

    A variant runs its backend's tuning values, or `values[backend]` when given, then each of `quality_targets`
    where the backend has a quality table. The engine's backend is back in force afterwards.
    """
    base = params or OmniDiffusionSamplingParams()
    values = values or {}
    plans = [_plan(engine, variant, values, quality_targets) for variant in variants]
    unused = sorted(set(values) - {plan.backend.name for plan in plans})
    if unused:
        raise ValueError(f"tuning values for {', '.join(unused)}, which no variant runs")
    uncached = NoCache()
    references = references if references is not None else References()
    reference_totals = {steps: _Totals() for steps in step_counts}
    totals = {
        (steps, index, key): _Totals()
        for steps in step_counts
        for index, plan in enumerate(plans)
        for key in range(len(plan.settings))
    }
    original = engine.use_cache_backend(uncached)
    try:
        for _ in range(warmup):
            generate(engine, prompts[0], base.replace(seed=seeds[0], num_inference_steps=step_counts[0]))
        for steps in step_counts:
            for prompt_index, prompt in enumerate(prompts):
                for seed in seeds:
                    engine.use_cache_backend(uncached)
                    reference = references.get(engine, prompt, seed, base.replace(num_inference_steps=steps))
                    reference_totals[steps].add(reference, None, checker)
                    for index, plan in enumerate(plans):
                        engine.use_cache_backend(plan.backend)
                        for key, setting in enumerate(plan.settings):
                            request = base.replace(num_inference_steps=steps, seed=seed, cache_config=setting)
                            totals[steps, index, key].add(generate(engine, prompt, request), reference, checker)
                log(f"{steps} steps: prompt {prompt_index + 1}/{len(prompts)} done")
    finally:
        engine.use_cache_backend(original)
    rows = []
    for steps in step_counts:
        uncached_totals = reference_totals[steps]
        rows.append(uncached_totals.row(UNCACHED, NoCache.name, steps, {}, uncached_totals))
        for index, plan in enumerate(plans):
            for key, setting in enumerate(plan.settings):
                result = totals[steps, index, key]
                rows.append(result.row(plan.variant.label, plan.backend.name, steps, setting, uncached_totals))
    return rows


# -- frontiers -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontierPoint:
    speedup: float
    psnr_db: float
    setting: dict[str, float]
    """{} for the uncached point."""


def pareto_frontier(points: Iterable[FrontierPoint]) -> list[FrontierPoint]:
    """The points that no other point beats on both speedup and mean PSNR, by increasing speedup (and so
    decreasing PSNR): the upper envelope of a speed-quality plot."""
    envelope: list[FrontierPoint] = []
    best_psnr = -np.inf
    for point in sorted(points, key=lambda p: (-p.speedup, -p.psnr_db)):
        if point.psnr_db > best_psnr:
            envelope.append(point)
            best_psnr = point.psnr_db
    return envelope[::-1]


@dataclass
class Frontier:
    variant: str
    backend: str
    steps: int
    points: list[FrontierPoint]

    @classmethod
    def of(cls, rows: Sequence[BenchRow], variant: str, steps: int) -> Frontier:
        """A variant's frontier at a step count, with the uncached point (1.0, PSNR_CAP_DB) among its points."""
        own = [row for row in rows if row.variant == variant and row.steps == steps]
        points = [FrontierPoint(1.0, PSNR_CAP_DB, {}), *(FrontierPoint(r.speedup, r.psnr_mean, r.setting) for r in own)]
        return cls(variant, own[0].backend, steps, pareto_frontier(points))

    def speedup_at(self, quality_db: float) -> float | None:
        """The speedup at which the frontier falls to `quality_db`: interpolated linearly between the last point
        at or above it and the next one, or the last point's speedup when every point is above it. None when only
        the uncached point reaches it. No interpolation starts from a PSNR at the cap (identical images): the cap
        is a convention, not a measurement."""
        above = [index for index, point in enumerate(self.points) if point.psnr_db >= quality_db]
        if not above or not self.points[above[-1]].setting:
            return None
        upper = self.points[above[-1]]
        if above[-1] + 1 == len(self.points) or upper.psnr_db >= PSNR_CAP_DB:
            return upper.speedup
        lower = self.points[above[-1] + 1]
        return upper.speedup + (lower.speedup - upper.speedup) * (upper.psnr_db - quality_db) / (
            upper.psnr_db - lower.psnr_db
        )

    def as_json(self, quality_levels: Sequence[float] = QUALITY_LEVELS_DB) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "backend": self.backend,
            "steps": self.steps,
            "points": [asdict(point) for point in self.points],
            "speedup_at_db": {f"{level:g}": self.speedup_at(level) for level in quality_levels},
        }


def frontiers(rows: Sequence[BenchRow]) -> list[Frontier]:
    """One frontier per (variant, step count) of the cached rows, in the rows' order."""
    keys = dict.fromkeys((row.variant, row.steps) for row in rows if row.variant != UNCACHED)
    return [Frontier.of(rows, variant, steps) for variant, steps in keys]


# -- reporting ---------------------------------------------------------------------------------------------------
def _db(value: float) -> str:
    return "inf" if value >= PSNR_CAP_DB else f"{value:.2f}"


def format_table(rows: Sequence[BenchRow]) -> str:
    header = (
        f"{'variant':<16} {'steps':>5} {'setting':>8} {'blocks/req':>10} {'speedup':>7} {'tf-speedup':>10} "
        f"{'ideal':>6} {'real/ideal':>10} {'PSNR dB':>8} {'min dB':>7} {'SSIM':>6} {'captions':>8} {'target':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        tf = "-" if r.transformer_speedup is None else f"{r.transformer_speedup:.2f}x"
        captions = "-" if r.caption_accuracy is None else f"{100 * r.caption_accuracy:.1f}%"
        target = "-" if r.meets_target is None else ("met" if r.meets_target else "MISSED")
        lines.append(
            f"{r.variant:<16} {r.steps:>5} {r.label:>8} {r.block_stack_evaluations:>10.2f} {r.speedup:>6.2f}x "
            f"{tf:>10} {r.ideal_speedup:>5.2f}x {r.realized_over_ideal:>10.3f} {_db(r.psnr_mean):>8} "
            f"{_db(r.psnr_min):>7} {r.ssim_mean:>6.4f} {captions:>8} {target:>6}"
        )
    return "\n".join(lines)


def format_speedups_at(fronts: Sequence[Frontier], quality_levels: Sequence[float] = QUALITY_LEVELS_DB) -> str:
    """Per step count, each variant's end-to-end speedup at each quality level, read off its frontier."""
    lines = []
    for steps in dict.fromkeys(front.steps for front in fronts):
        levels = "/".join(f"{level:g}" for level in quality_levels)
        lines.append(f"speedup at {levels} dB mean PSNR (end to end, on each frontier), {steps} steps:")
        lines.append(f"  {'variant':<16}" + "".join(f"{f'{level:g} dB':>9}" for level in quality_levels))
        for front in (front for front in fronts if front.steps == steps):
            cells = [front.speedup_at(level) for level in quality_levels]
            lines.append(f"  {front.variant:<16}" + "".join(f"{'-' if c is None else f'{c:.2f}x':>9}" for c in cells))
    return "\n".join(lines)


def rows_as_json(rows: Sequence[BenchRow], **context) -> str:
    payload = {
        **context,
        "quality_levels_db": list(QUALITY_LEVELS_DB),
        "rows": [
            {
                **asdict(r),
                "realized_over_ideal": r.realized_over_ideal,
                "transformer_realized_over_ideal": r.transformer_realized_over_ideal,
            }
            for r in rows
        ],
        "frontiers": [front.as_json() for front in frontiers(rows)],
    }
    return json.dumps(payload, indent=2)


def plot(rows: Sequence[BenchRow], path: str | Path, title: str) -> None:
    """Every variant's frontier, one panel per step count: speedup against mean PSNR, the measured points
    marked, the frontier's points labelled with their setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'teaserve[dev]' (or pip install matplotlib)") from None
    fronts = frontiers(rows)
    step_counts = list(dict.fromkeys(front.steps for front in fronts))
    figure, axes = plt.subplots(1, len(step_counts), figsize=(6.5 * len(step_counts), 4.5), squeeze=False)
    for axis, steps in zip(axes[0], step_counts, strict=True):
        for front in (front for front in fronts if front.steps == steps):
            measured = [r for r in rows if r.variant == front.variant and r.steps == steps]
            (line,) = axis.plot(
                [p.speedup for p in front.points], [p.psnr_db for p in front.points], marker="o", label=front.variant
            )
            axis.scatter([r.speedup for r in measured], [r.psnr_mean for r in measured], color=line.get_color(), s=12)
            for point in front.points[1:]:
                label = next(iter(point.setting.values()))
                axis.annotate(f"{label:g}", (point.speedup, point.psnr_db), xytext=(4, 4), textcoords="offset points")
        for level in QUALITY_LEVELS_DB:
            axis.axhline(level, color="grey", linewidth=0.5, linestyle=":")
        # Identical images sit at the PSNR cap, far above the rest: the axis shows the measured range.
        measured_db = [r.psnr_mean for r in rows if r.steps == steps and r.psnr_mean < PSNR_CAP_DB]
        if measured_db:
            axis.set_ylim(top=min(PSNR_CAP_DB, max(*measured_db, *QUALITY_LEVELS_DB) + 10))
        axis.set_xlabel("end-to-end speedup vs uncached (same run)")
        axis.set_ylabel("mean PSNR vs uncached (dB)")
        axis.set_title(f"{steps} steps")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
