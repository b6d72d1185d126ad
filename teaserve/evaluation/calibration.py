"""Calibrating cache backends to a model: what each method fits from uncached runs, then its quality table.

One orchestration serves every backend (`calibrate`):

1. Record, once for all backends: every calibration prompt x seed runs uncached (the 'none' backend, no hooks) at
   every step count with every backend's calibrator attached to the transformer, `end_request(steps)` after each
   request. The uncached images are kept: they are the references of every later sweep.
2. Fit: each calibrator's `fit()` gives its backend's server settings. A `ProfileCalibrator` may offer several
   candidate fits; with validation prompts each candidate's tuning sweep is scored by its mean PSNR at equal
   block-stack evaluations (over all step counts) and the best one is kept.
3. Quality table: at every step count the backend's tuning grid (`sweeps.tuning_grid`: its tuning values, the
   midpoints and one value beyond each end) runs on the calibration prompts with the fitted settings; the mean PSNR
   against the recorded uncached images, per (step count, tuning value), is its `quality_table`, which lets
   requests ask for a `quality_target` instead of a tuning value.

The profile (`Calibration.profile`) holds the settings by backend under "cache" (what --cache-profile loads).

TeaCache's calibrator is defined here (its backend offers none itself): prompts run uncached while
`record_gate_changes` records, per step and CFG branch, the relative L1 change of the gate signal (x) and of the
block stack's output (y); a degree-4 polynomial of y over x is fitted to all of them together, kept with the x
range it was fitted on, outside which TeaCache does not trust it. Output change is only a proxy of what a skipped
step costs the final image, so its candidates are the polynomials between the fit and its mean value (shrinkage 1
to 0), compared as above. Its profile fields stay at the top level too, where `coefficients_file` reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cache import CACHE_BACKENDS, CacheSettingsError, GateRecorder, Rescaling, TeaCacheBackend
from ..cache.base import QUALITY_TABLE, Calibrator, QualityTable
from ..engine import AsyncEngine, OmniDiffusionSamplingParams
from ..pipelines import LoadedModel
from .backends import sweep_backends, try_applying
from .bench import BenchRow, References, run_bench
from .sweeps import SHRINKAGES, VALIDATION_SPEEDUPS, Variant, tuning_grid

Pair = tuple[float, float]
Log = Callable[[str], None]


class ProfileCalibrator(Calibrator):
    """A calibrator that `teaserve calibrate` can ask for more than `fit()`: which candidate validation chose,
    a report in words, and fields for the top level of the profile."""

    def choose(self, label: str, scores: dict[str, float]) -> None:
        """From now on `fit()` gives the candidate `label`; `scores` are every candidate's validation scores."""

    def report(self) -> list[str]:
        return []

    def details(self) -> dict[str, Any]:
        return {}


# -- TeaCache's polynomial ---------------------------------------------------------------------------------------
@dataclass
class Fit:
    coefficients: list[float]
    r2: float
    points: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    y_mean: float


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 4) -> Fit:
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} (gate change, output change) pairs to fit, got {len(x)}")
    coefficients = np.polyfit(x, y, degree)
    residual = ((np.polyval(coefficients, x) - y) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return Fit(
        coefficients=[float(c) for c in coefficients],
        r2=float(1 - residual / total) if total > 0 else 1.0,
        points=len(x),
        x_range=(float(x.min()), float(x.max())),
        y_range=(float(y.min()), float(y.max())),
        y_mean=float(y.mean()),
    )


def shrunk(fit: Fit, shrinkage: float) -> list[float]:
    """shrinkage * fit + (1 - shrinkage) * mean output change: 1 is the fit, 0 a constant (fixed intervals)."""
    coefficients = [shrinkage * c for c in fit.coefficients]
    coefficients[-1] += (1 - shrinkage) * fit.y_mean
    return coefficients


def coefficient_settings(fit: Fit, shrinkage: float) -> dict[str, Any]:
    """tea_cache settings for a shrinkage of the fit, with the range it was fitted on."""
    return {"coefficients": shrunk(fit, shrinkage), "x_range": list(fit.x_range)}


def usable(coefficients: list[float], x_range: tuple[float, float]) -> bool:
    """Whether TeaCache accepts the polynomial on its range (positive there, bounded coefficients)."""
    try:
        Rescaling(tuple(coefficients), x_range)
    except ValueError:
        return False
    return True


class TeaCacheCalibrator(ProfileCalibrator):
    """(gate change, output change) pairs by step count and branch -> TeaCache's rescaling polynomial."""

    def __init__(self) -> None:
        self.pairs: dict[int, dict[str, list[Pair]]] = {}
        self.recorder: GateRecorder | None = None
        self.shrinkage: float | None = None
        self.scores: dict[str, float] = {}
        self._fit: Fit | None = None

    def attach(self, transformer) -> None:
        self.recorder = GateRecorder(transformer)

    def detach(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def end_request(self, num_steps: int) -> None:
        assert self.recorder is not None, "attached before requests run"
        step_pairs = self.pairs.setdefault(num_steps, {})
        for branch, pairs in self.recorder.take().items():
            step_pairs.setdefault(branch, []).extend(pairs)

    @property
    def polynomial(self) -> Fit:
        if self._fit is None:
            everything = self.points()
            self._fit = fit_polynomial(everything[:, 0], everything[:, 1])
        return self._fit

    def candidates(self) -> dict[str, dict[str, Any]]:
        """The usable shrinkages of the fit, the largest first (TeaCache refuses polynomials that are not positive
        over their range)."""
        fit = self.polynomial
        found = {f"{s:g}": coefficient_settings(fit, s) for s in SHRINKAGES if usable(shrunk(fit, s), fit.x_range)}
        if not found:
            raise ValueError("no shrinkage of TeaCache's fit is positive over the fitted range: record more prompts")
        return found

    def choose(self, label: str, scores: dict[str, float]) -> None:
        self.shrinkage, self.scores = float(label), scores

    def fit(self) -> dict[str, Any]:
        if self.shrinkage is None:
            self.shrinkage = float(next(iter(self.candidates())))
        return coefficient_settings(self.polynomial, self.shrinkage)

    @property
    def step_counts(self) -> list[int]:
        return sorted(self.pairs)

    @property
    def branches(self) -> list[str]:
        return sorted({name for step_pairs in self.pairs.values() for name in step_pairs})

    def points(self, steps: int | None = None, branch: str | None = None) -> np.ndarray:
        """The pairs as an array [n, 2], optionally of one step count and/or branch."""
        pairs = [
            pair
            for step_count, branches in self.pairs.items()
            if steps in (None, step_count)
            for name, branch_pairs in branches.items()
            if branch in (None, name)
            for pair in branch_pairs
        ]
        return np.array(pairs, dtype=np.float64).reshape(-1, 2)

    def report(self) -> list[str]:
        fit = self.polynomial
        lines = [
            f"{fit.points} points (all step counts and branches), gate change x in [{fit.x_range[0]:.4g}, "
            f"{fit.x_range[1]:.4g}], output change y in [{fit.y_range[0]:.4g}, {fit.y_range[1]:.4g}]"
        ]
        for steps in self.step_counts:
            points = self.points(steps)
            lines.append(
                f"  {steps} steps: {len(points)} points, x in [{points[:, 0].min():.4g}, {points[:, 0].max():.4g}],"
                f" R^2 of the joint fit on them {_r2(fit.coefficients, points):.3f}"
            )
        for branch in self.branches:
            points = self.points(branch=branch)
            lines.append(
                f"  branch {branch}: {len(points)} points, R^2 of the joint fit on them "
                f"{_r2(fit.coefficients, points):.3f}"
            )
        lines.append(f"degree-4 fit of output change (highest power first), R^2 {fit.r2:.4f}:")
        lines.append("  " + _rounded(fit.coefficients))
        if self.scores:
            lines.append(
                f"validation: mean PSNR at up to {VALIDATION_SPEEDUPS}x fewer block evaluations, by shrinkage "
                "towards the mean: " + ", ".join(f"{name}: {value:.2f} dB" for name, value in self.scores.items())
            )
        lines.append(f"coefficients (shrinkage {self.shrinkage:g}): {_rounded(self.fit()['coefficients'])}")
        return lines

    def details(self) -> dict[str, Any]:
        fit = self.polynomial
        return {
            "branches": self.branches,
            **self.fit(),
            "fit_coefficients": fit.coefficients,
            "shrinkage": self.shrinkage,
            "validation": {"psnr_by_shrinkage": self.scores},
            "r2": fit.r2,
            "points": fit.points,
            "y_range": list(fit.y_range),
            "by_steps": {
                str(steps): {
                    "points": len(points),
                    "x_range": [float(points[:, 0].min()), float(points[:, 0].max())],
                    "r2": _r2(fit.coefficients, points),
                }
                for steps in self.step_counts
                for points in [self.points(steps)]
            },
        }


def _r2(coefficients: list[float], points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - ((np.polyval(coefficients, x) - y) ** 2).sum() / total) if total > 0 else 1.0


def _rounded(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{value:.8g}" for value in values) + "]"


CALIBRATORS_HERE: dict[str, Callable[[], Calibrator]] = {TeaCacheBackend.name: TeaCacheCalibrator}
"""Calibrators of backends that offer none themselves."""


def calibrator_for(name: str) -> Calibrator | None:
    made_here = CALIBRATORS_HERE.get(name)
    return CACHE_BACKENDS[name].calibrator() or (made_here() if made_here else None)


# -- the orchestration -------------------------------------------------------------------------------------------
@dataclass
class BackendCalibration:
    """What calibration found for one backend."""

    name: str
    settings: dict[str, Any]
    """The fitted server settings (without the quality table)."""
    grid: list[float]
    table: QualityTable
    calibrator: Calibrator | None = None

    @property
    def profile_settings(self) -> dict[str, Any]:
        return {**self.settings, QUALITY_TABLE: self.table.as_json()}


@dataclass
class Calibration:
    model: str
    transformer: str
    step_counts: list[int]
    prompts: int
    seeds: list[int]
    validation_prompts: int
    backends: list[BackendCalibration] = field(default_factory=list)

    def profile(self) -> dict[str, Any]:
        """The profile --cache-profile loads: settings and quality table by backend under "cache"."""
        profile: dict[str, Any] = {
            "model": self.model,
            "transformer": self.transformer,
            "num_inference_steps": self.step_counts,
            "prompts": self.prompts,
            "validation_prompts": self.validation_prompts,
            "seeds": self.seeds,
        }
        for result in self.backends:
            if isinstance(result.calibrator, ProfileCalibrator):
                profile.update(result.calibrator.details())
        profile["cache"] = {result.name: result.profile_settings for result in self.backends}
        return profile

    def report(self) -> list[str]:
        lines = []
        for result in self.backends:
            key = CACHE_BACKENDS[result.name].tuning_key
            lines.append(f"{result.name}:")
            if isinstance(result.calibrator, ProfileCalibrator):
                lines += ["  " + line for line in result.calibrator.report()]
            elif result.settings:
                lines.append(f"  fitted settings: {', '.join(sorted(result.settings))}")
            lines.append(f"  quality table, mean PSNR (dB) against uncached by {key}:")
            for steps, pairs in sorted(result.table.rows.items()):
                lines.append(f"    {steps:>4} steps: " + ", ".join(f"{value:g}: {db:.2f}" for value, db in pairs))
        return lines


def calibrate(
    model: LoadedModel,
    backends: Sequence[str] | None,
    prompts: Sequence[str],
    validation_prompts: Sequence[str],
    seeds: Sequence[int],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    log: Log = lambda message: None,
) -> Calibration:
    """Calibrate `backends` (None: every backend with a tuning key that works on this model, the others skipped
    with a note) on `prompts` x `seeds` at every step count; see the module's description."""
    # The recorders observe each CFG branch's own transformer calls: the diffusers pipeline's, not batched ones.
    engine = AsyncEngine(model, cache_backend="none", batched_runs=False)
    try:
        names = sweep_backends(engine, backends, apply=False, log=log)
        calibrators = attach_calibrators(engine, names, explicit=backends is not None, log=log)
        names = [name for name in names if name in calibrators]
        if not names:
            raise ValueError("no cache backend can be calibrated on this model (see the notes above)")
        references = References()
        try:
            record(engine, calibrators, prompts, seeds, params, step_counts, references, log)
        finally:
            for calibrator in calibrators.values():
                if calibrator is not None:
                    calibrator.detach()
        calibration = Calibration(
            model=model.name,
            transformer=type(model.pipeline.transformer).__name__,
            step_counts=list(step_counts),
            prompts=len(prompts),
            seeds=list(seeds),
            validation_prompts=len(validation_prompts),
        )
        for name in names:
            calibrator = calibrators[name]
            try:
                settings = {} if calibrator is None else calibrator.fit()
                candidates = {} if calibrator is None else calibrator.candidates()
                if validation_prompts and len(candidates) > 1:
                    label, scores = validate(
                        engine, name, candidates, validation_prompts, params, step_counts, references, log
                    )
                    settings = candidates[label]
                    if isinstance(calibrator, ProfileCalibrator):
                        calibrator.choose(label, scores)
                grid, table = quality_table(
                    engine, name, settings, prompts, seeds, params, step_counts, references, log
                )
            except Exception as error:  # a long calibration keeps every other backend's results
                skip_or_raise(name, error, explicit=backends is not None, log=log)
                continue
            calibration.backends.append(BackendCalibration(name, settings, grid, table, calibrator))
    finally:
        engine.shutdown()
    if not calibration.backends:
        raise ValueError("no cache backend could be calibrated on this model (see the notes above)")
    return calibration


def skip_or_raise(name: str, error: Exception, *, explicit: bool, log: Log) -> None:
    """A backend that fails is dropped with a note, unless the user named it (`explicit`): then it stops the run."""
    if explicit:
        raise error
    log(f"skipping {name}: {type(error).__name__}: {error}")


def attach_calibrators(
    engine: AsyncEngine, names: Sequence[str], *, explicit: bool, log: Log
) -> dict[str, Calibrator | None]:
    """Each backend's calibrator attached to the transformer (None for a backend without one, which must apply
    with the model's own settings instead). A backend that fails either way is skipped with a note, or, when
    named by the user (`explicit`), stops the calibration."""
    transformer = engine.model.pipeline.transformer
    attached: dict[str, Calibrator | None] = {}
    calibrators = {}
    for name in names:  # a backend without a calibrator is tried on the bare transformer, before any recorder
        try:
            calibrators[name] = calibrator_for(name)
            if calibrators[name] is None:
                try_applying(engine, engine.create_cache_backend(name))
        except Exception as error:  # any failure to apply one method only drops that method
            skip_or_raise(name, error, explicit=explicit, log=log)
            calibrators.pop(name, None)
    try:
        for name, calibrator in calibrators.items():
            if calibrator is not None:
                try:
                    calibrator.attach(transformer)
                except Exception as error:  # any failure to attach one calibrator only drops that method
                    skip_or_raise(name, error, explicit=explicit, log=log)
                    continue
            attached[name] = calibrator
    except BaseException:
        for calibrator in attached.values():
            if calibrator is not None:
                calibrator.detach()
        raise
    return attached


def record(
    engine: AsyncEngine,
    calibrators: Mapping[str, Calibrator | None],
    prompts: Sequence[str],
    seeds: Sequence[int],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    references: References,
    log: Log = lambda message: None,
) -> None:
    """Every prompt x seed uncached at every step count (into `references`, which must not hold them yet), each
    attached calibrator filing what it recorded after each request."""
    for steps in step_counts:
        for prompt in prompts:
            for seed in seeds:
                references.get(engine, prompt, seed, params.replace(num_inference_steps=steps))
                for calibrator in calibrators.values():
                    if calibrator is not None:
                        calibrator.end_request(steps)
        log(f"{steps} steps recorded uncached")


def psnr_at_speedups(sweeps: Sequence[Sequence[BenchRow]], speedups=VALIDATION_SPEEDUPS) -> list[float]:
    """Mean PSNR of each candidate's tuning sweep, interpolated at the given ideal speedups that every sweep
    reaches (so that no candidate is scored where it was never measured)."""
    reached = min(max(row.ideal_speedup for row in rows) for rows in sweeps)
    points = [speedup for speedup in speedups if speedup <= reached] or [reached]
    scores = []
    for rows in sweeps:
        curve = sorted((row.ideal_speedup, row.psnr_mean) for row in rows)
        scores.append(float(np.mean(np.interp(points, [p[0] for p in curve], [p[1] for p in curve]))))
    return scores


def validate(
    engine: AsyncEngine,
    name: str,
    candidates: dict[str, dict[str, Any]],
    prompts: Sequence[str],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    references: References,
    log: Log = lambda message: None,
) -> tuple[str, dict[str, float]]:
    """The candidate whose tuning sweeps keep the most PSNR at equal block-stack evaluations over all step
    counts, and every candidate's mean score (seed 0 on the validation prompts)."""
    variants = [Variant(label, name, settings) for label, settings in candidates.items()]
    rows = run_bench(engine, prompts, [0], step_counts, variants, params=params, warmup=0, references=references)
    scores: dict[str, list[float]] = {variant.label: [] for variant in variants}
    for steps in step_counts:
        sweeps = [[row for row in rows if row.variant == variant.label and row.steps == steps] for variant in variants]
        for variant, score in zip(variants, psnr_at_speedups(sweeps), strict=True):
            scores[variant.label].append(score)
    log(f"{name}: {len(candidates)} candidates validated")
    means = {label: float(np.mean(values)) for label, values in scores.items()}
    return max(means, key=lambda label: means[label]), means


def quality_table(
    engine: AsyncEngine,
    name: str,
    settings: dict[str, Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    references: References,
    log: Log = lambda message: None,
) -> tuple[list[float], QualityTable]:
    """(the tuning grid, the quality table measured on it) of backend `name` with `settings`."""
    backend = engine.create_cache_backend(name, settings)
    key = backend.tuning_key
    assert key is not None, "only backends with a tuning key are calibrated"
    grid = [value for value in tuning_grid(backend.tuning_values) if _accepts(backend.check_overrides, {key: value})]
    rows = run_bench(
        engine,
        prompts,
        seeds,
        step_counts,
        [Variant(name, name, settings)],
        values={name: grid},
        params=params,
        warmup=0,
        references=references,
    )
    log(f"{name}: quality table measured at {len(grid)} values of {key}")
    table = QualityTable(
        {
            steps: tuple((row.setting[key], row.psnr_mean) for row in rows if row.steps == steps and row.setting)
            for steps in step_counts
        }
    )
    return grid, table


def _accepts(check: Callable[[dict[str, Any]], Any], setting: dict[str, Any]) -> bool:
    try:
        check(setting)
    except CacheSettingsError:
        return False
    return True
