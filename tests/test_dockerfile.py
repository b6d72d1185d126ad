"""The Dockerfile cannot be built here: check that what it runs exists and fits the server."""

import re
import shlex
from pathlib import Path

from teaserve.cli.args import build_parser

DOCKERFILE = (Path(__file__).parent.parent / "Dockerfile").read_text()


def instruction(name: str) -> str:
    joined = DOCKERFILE.replace("\\\n", " ")
    return re.search(rf"^{name}\s+(.*)$", joined, re.MULTILINE).group(1).strip()


def test_entrypoint_is_teaserve_serve_with_flags_the_cli_accepts():
    entrypoint = __import__("json").loads(instruction("ENTRYPOINT"))
    assert entrypoint[:2] == ["teaserve", "serve"]
    args = build_parser().parse_args([*entrypoint[1:], "Qwen/Qwen-Image", "--cache-backend", "tea_cache"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8091, "Qwen/Qwen-Image")


def test_port_user_volume_and_healthcheck():
    assert instruction("EXPOSE") == "8091"
    assert instruction("USER") not in ("root", "0")
    assert "/data" in instruction("VOLUME") and "HF_HOME=/data/huggingface" in DOCKERFILE
    healthcheck = instruction("HEALTHCHECK")
    assert "http://127.0.0.1:8091/health" in healthcheck


def test_installs_a_cuda_torch_from_pypi_and_never_torchvision():
    installs = [line for line in DOCKERFILE.splitlines() if "pip install" in line]
    assert any(shlex.split(line.split("RUN", 1)[-1])[-1] == "torch==2.13.0" for line in installs)
    assert "torchvision" not in DOCKERFILE and "--index-url" not in DOCKERFILE
