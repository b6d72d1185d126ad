"""benchmarks/throughput.py: the throughput script's code against real `teaserve serve` processes.

Two runs of the script side by side, each in its own process: `--smoke` on the embedded model (both modes, every
level, the identity check), and one whose requests the server refuses (more steps than its limit), which must end
with the error in the document and its server stopped.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_REQUESTS = 4
SMOKE_CONCURRENCY = [1, 2]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("throughput")
    runs = {
        "smoke": ["--smoke"],
        "refused": ["--steps", "100000", "--requests", "2", "--concurrency", "1"],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "benchmarks/throughput.py", *flags, "--json", str(folder / f"{name}.json")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, flags in runs.items()
    }
    results = {}
    for name, process in processes.items():
        output = process.communicate(timeout=600)[0]
        results[name] = (process.returncode, output, json.loads((folder / f"{name}.json").read_text()))
    return results


def test_smoke_measures_both_modes_at_every_level(documents):
    status, output, document = documents["smoke"]
    assert status == 0, output
    assert document["smoke"] is True and "error" not in document
    assert document["workload"]["model"] == "teaserve/shapes-qwen-image"
    assert document["workload"]["size"] == "64x64" and document["workload"]["steps"] == 2
    assert document["workload"]["distinct_prompts"] == SMOKE_REQUESTS  # 16 prompts, 4 requests ask for 4 of them
    assert set(document["modes"]) == {"off", "on"}
    assert document["modes"]["off"]["server_flags"] == ["--max-batch-size", "1"]
    assert document["modes"]["on"]["server_flags"] == ["--max-batch-size", "8", "--batch-wait-ms", "20.0"]
    for mode in document["modes"].values():
        assert mode["exit_status"] == 0  # stopped by SIGTERM: drained and exited cleanly
        assert [level["concurrency"] for level in mode["levels"]] == SMOKE_CONCURRENCY
        for level in mode["levels"]:
            assert level["requests"] == SMOKE_REQUESTS
            assert level["requests_per_second"] == pytest.approx(SMOKE_REQUESTS / level["seconds"])
            assert level["requests_per_second"] > 0
            assert 0 < level["p50_ms"] <= level["p99_ms"]
    on = {level["concurrency"]: level["requests_per_second"] for level in document["modes"]["on"]["levels"]}
    off = {level["concurrency"]: level["requests_per_second"] for level in document["modes"]["off"]["levels"]}
    assert [row["concurrency"] for row in document["speedup"]] == SMOKE_CONCURRENCY
    for row in document["speedup"]:
        assert row["speedup"] == pytest.approx(on[row["concurrency"]] / off[row["concurrency"]])
    assert "batching on" in output and "on/off" in output


def test_smoke_compares_every_image_with_its_solo_reference(documents):
    _, _, document = documents["smoke"]
    check = document["identity"]
    assert check["reference"] == {"mode": "off", "concurrency": 1} and check["tolerance"] == 2
    compared = [(row["mode"], row["concurrency"]) for row in check["per_level"]]
    assert compared == [("off", 2), ("on", 1), ("on", 2)]
    assert all(row["images"] == SMOKE_REQUESTS for row in check["per_level"])
    assert check["images"] == 3 * SMOKE_REQUESTS
    assert check["max_abs_diff"] == max(row["max_abs_diff"] for row in check["per_level"])
    assert 0 <= check["max_abs_diff"] <= 255
    # batching off runs every request alone at any concurrency: the same request gives the same pixels
    (solo,) = [row for row in check["per_level"] if row["mode"] == "off"]
    assert solo["max_abs_diff"] == 0 and solo["identical"] == SMOKE_REQUESTS


def test_a_refused_request_ends_the_run_with_its_error_and_the_server_stopped(documents):
    status, output, document = documents["refused"]
    assert status == 1
    assert document["error"].startswith("BadRequestError") and "num_inference_steps" in document["error"]
    assert list(document["modes"]) == ["off"]  # the run stopped before the second server
    assert document["modes"]["off"]["exit_status"] == 0 and "levels" not in document["modes"]["off"]
    assert "identity" not in document and "elapsed" in output


def test_identity_counts_images_over_the_tolerance(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput

    def level(concurrency, *values):
        measured = throughput.Level(concurrency)
        measured.images = {index: np.full((2, 2, 3), value, np.uint8) for index, value in enumerate(values)}
        return measured

    results = {"off": [level(1, 10, 200, 0)], "on": [level(1, 10, 202, 0), level(4, 13, 200, 255)]}
    check = throughput.identity(results, tolerance=2)
    assert check["per_level"] == [
        {"mode": "on", "concurrency": 1, "images": 3, "max_abs_diff": 2, "identical": 2, "over_tolerance": 0},
        {"mode": "on", "concurrency": 4, "images": 3, "max_abs_diff": 255, "identical": 1, "over_tolerance": 2},
    ]
    assert (check["images"], check["max_abs_diff"], check["over_tolerance"]) == (6, 255, 2)
