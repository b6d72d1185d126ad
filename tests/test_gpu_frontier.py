"""benchmarks/gpu_frontier.py --smoke: the GPU frontier script's code, on a tiny transformer on the CPU.

One subprocess registers a backend that fails to apply, then runs the script twice: with its default budget and with
none. The documents must cover every registered backend, report the failing one instead of crashing, and stop
between measurements when the budget is spent.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from teaserve.cache import CACHE_BACKENDS

ROOT = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 8
BROKEN = "broken_for_test"

PROGRAM = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "benchmarks")
    import gpu_frontier
    from teaserve.cache import CACHE_BACKENDS, CacheBackend

    class Broken(CacheBackend):
        name = "broken_for_test"
        request_keys = ("enabled", "speed")
        tuning_key = "speed"
        tuning_values = (1.0, 2.0)

        def configure_method(self, settings):
            pass

        def apply(self, pipeline):
            raise RuntimeError("cannot apply")

        def remove(self, pipeline):
            pass

        def check_method_overrides(self, overrides):
            pass

        def start_request(self, num_steps, overrides):
            pass

    CACHE_BACKENDS[Broken.name] = Broken
    full, spent = sys.argv[1:3]
    assert gpu_frontier.main(["--smoke", "--out", full]) == 0
    assert gpu_frontier.main(["--smoke", "--budget-seconds", "0", "--out", spent]) == 0
    """
)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontier")
    full, spent = folder / "full.json", folder / "spent.json"
    subprocess.run(
        [sys.executable, "-c", PROGRAM, str(full), str(spent)], cwd=ROOT, capture_output=True, timeout=600, check=True
    )
    return json.loads(full.read_text()), json.loads(spent.read_text())


def test_every_registered_backend_is_measured_or_reported(documents):
    document, _ = documents
    assert document["workload"]["steps"] == SMOKE_STEPS and document["workload"]["smoke"] is True
    assert document["model"]["class"] == "QwenImageTransformer2DModel" and document["model"]["weights"] == "random"
    assert document["uncached"]["stack_evaluations"] == 2 * SMOKE_STEPS and document["uncached"]["seconds"] > 0
    backends = document["backends"]
    assert set(backends) == {*CACHE_BACKENDS, BROKEN}
    for name, result in backends.items():
        tuning_key = CACHE_BACKENDS[name].tuning_key if name != BROKEN else "speed"
        assert result["tuning_key"] == tuning_key
        assert tuning_key is None or "runs" in result or "error" in result
        if "runs" in result:
            assert result["restored"] is True


def test_a_measured_backend_reports_overhead_evaluations_and_speedups(documents):
    document, _ = documents
    result = document["backends"]["tea_cache"]
    assert result["gate_overhead"]["skipped_steps"] == 0 and result["gate_overhead"]["steps"] == 4
    values = [run["rel_l1_thresh"] for run in result["runs"]]
    assert len(values) == 2 and values == sorted(values) and set(values) <= set(result["tuning_values"])
    for run in result["runs"]:
        assert run["computed_steps"] + run["skipped_steps"] == 2 * SMOKE_STEPS
        assert run["stack_evaluations"] == run["computed_steps"]
        assert run["ideal_speedup"] == pytest.approx(2 * SMOKE_STEPS / run["stack_evaluations"])
        assert run["realized_speedup"] == pytest.approx(document["uncached"]["seconds"] / run["seconds"])
        assert set(run["schedules"]) == {"cond", "uncond"}
    assert result["runs"][1]["skipped_steps"] > result["runs"][0]["skipped_steps"]


def test_a_failing_backend_is_an_error_in_the_document_and_the_run_goes_on(documents):
    document, _ = documents
    broken = document["backends"][BROKEN]
    assert broken["error"] == "RuntimeError: cannot apply"
    assert broken["restored"] is True
    assert "runs" in document["backends"]["tea_cache"]


def test_a_spent_budget_stops_between_measurements(documents):
    _, document = documents
    assert document["stopped_early"] is True and "uncached" in document and "uncached_again" not in document
    for name, result in document["backends"].items():
        if result["tuning_key"] is not None:
            assert result["skipped"].startswith("time budget"), name
            assert "runs" not in result


def test_a_run_still_going_when_the_budget_is_spent_stops_after_its_current_step(monkeypatch):
    import time

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_frontier

    workload = gpu_frontier.Workload(4, 4, 3, 2, 4.0, torch.device("cpu"), torch.float32)
    transformer, _ = gpu_frontier.build_transformer(None, True, workload)
    denoiser = gpu_frontier.Denoiser(transformer, workload)
    seconds, latents = denoiser.run(3, deadline=time.monotonic() + 600)
    assert seconds > 0 and latents.shape == denoiser.noise.shape
    with pytest.raises(TimeoutError, match="the time budget ran out after 1 of 3 steps"):
        denoiser.run(3, deadline=time.monotonic() - 1)
