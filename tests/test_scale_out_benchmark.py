"""benchmarks/scale_out.py --smoke: two real `teaserve serve --ray` processes in turn (one replica, then two), each
with its own Ray instance on loopback, its folder under the test's temporary folder and the auth token in the
environment."""

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_REQUESTS = 4
SMOKE_CONCURRENCY = [1, 2]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (teaserve[ray])"),
    pytest.mark.slow,
    pytest.mark.timeout(900),  # two Ray instances start in turn: more than the suite's default per test
]


def test_smoke_measures_one_and_two_replicas_and_compares_every_image_with_the_serial_one(tmp_path):
    with tempfile.TemporaryDirectory(prefix="ray-") as ray_folder:  # short: Ray's socket paths must fit
        environment = {
            **os.environ,
            "RAY_TMPDIR": ray_folder,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),  # no ~/.ray/auth_token is written
        }
        result = subprocess.run(
            [sys.executable, "benchmarks/scale_out.py", "--smoke", "--json", str(tmp_path / "scale.json")],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((tmp_path / "scale.json").read_text())
    assert "error" not in document and document["workload"]["steps"] == 2
    assert document["server"]["torch_threads_per_replica"] == 1
    assert {name: mode["server_flags"][:3] for name, mode in document["modes"].items()} == {
        "1": ["--ray", "--replicas", "1"],
        "2": ["--ray", "--replicas", "2"],
    }
    for mode in document["modes"].values():
        assert mode["exit_status"] == 0  # SIGTERM: Serve and Ray shut down cleanly
        assert [level["concurrency"] for level in mode["levels"]] == SMOKE_CONCURRENCY
        assert all(level["requests"] == SMOKE_REQUESTS for level in mode["levels"])
    one = {level["concurrency"]: level["requests_per_second"] for level in document["modes"]["1"]["levels"]}
    two = {level["concurrency"]: level["requests_per_second"] for level in document["modes"]["2"]["levels"]}
    assert [(row["concurrency"], row["speedup"]) for row in document["speedup"]] == [
        (clients, pytest.approx(two[clients] / one[clients])) for clients in SMOKE_CONCURRENCY
    ]
    check = document["identity"]
    assert check["reference"] == {"mode": "1", "concurrency": 1}
    assert check["images"] == 3 * SMOKE_REQUESTS  # 1 replica at 2 clients, 2 replicas at 1 and 2 clients
    assert check["max_abs_diff"] == 0  # one request at a time on one torch thread: the same pixels anywhere
    assert "2 replicas" in result.stdout and "2/1" in result.stdout
