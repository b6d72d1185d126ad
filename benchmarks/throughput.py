"""Requests per second and latency of a real `teaserve serve`, request batching off and on, side by side.

For each mode one server starts as its own process on a free port (batching off: `--max-batch-size 1`; on:
`--max-batch-size 8 --batch-wait-ms 20`, both flags of this script), with the model's own cache backend unless
`--cache-backend` / `--cache-config` say otherwise, and the server's default torch threads unless `--torch-threads`
sets OMP_NUM_THREADS for it. Once /ready answers, it is warmed up with one request per distinct prompt of the
workload (so that no level pays for first-time prompt encoding), sent at the highest concurrency. Then, for every
concurrency c (1, 4, 8), c clients (the official OpenAI SDK, asyncio) send requests back to back until the level's
requests (default 48) are done. Every level sends the same requests: request i asks for prompt i mod 16
(`--prompts`) of the embedded model's held-out captions (or of `--prompts-file`, or of generic prompts for another
model) with seed i, so both modes and all levels generate the same (prompt, seed) set. A level's requests per second
= its requests / its wall time; p50 and p99 are of the per-request latencies seen by the clients.

Identity: every image is decoded (PNG -> uint8 RGB) and compared to the image of the same request made with
batching off at concurrency 1, the solo reference (batching off at a higher concurrency still runs requests one by
one, so it is compared too). The report gives the largest absolute pixel difference and the number of images that
differ by more than `--tolerance` (default 2 of 255: float differences of a batched computation that survive the
rounding to uint8).

The table goes to stdout, progress to stderr, the JSON document to `--json`. A server is always stopped (SIGTERM,
then kill) when its mode ends, also on errors.

    python benchmarks/throughput.py                     # the embedded model on the CPU: a few minutes
    python benchmarks/throughput.py --json throughput.json --batch-wait-ms 10 --torch-threads 2
    python benchmarks/throughput.py Qwen/Qwen-Image --device cuda --requests 32 --size 1024x1024
    python benchmarks/throughput.py --smoke             # 2 steps, 4 requests at concurrency 1 and 2: seconds
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
from PIL import Image

from teaserve.evaluation.prompts import model_prompts

REFERENCE = ("off", 1)
"""(mode, concurrency) of the solo reference images."""
SMOKE_REQUESTS, SMOKE_CONCURRENCY, SMOKE_STEPS = 4, (1, 2), 2
"""--smoke: requests per level, the levels, denoising steps."""


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    server_flags: tuple[str, ...]


@dataclass
class Level:
    """One concurrency level of one mode: what the clients measured."""

    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_queue_seconds: list[float] = field(default_factory=list)
    server_run_seconds: list[float] = field(default_factory=list)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    """Request index -> its image as uint8 RGB."""

    def summary(self) -> dict[str, Any]:
        p50, p99 = np.percentile(self.latencies, [50, 99])
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies),
            "seconds": self.seconds,
            "requests_per_second": len(self.latencies) / self.seconds,
            "p50_ms": 1000 * float(p50),
            "p99_ms": 1000 * float(p99),
            "mean_ms": 1000 * float(np.mean(self.latencies)),
            "server_queue_ms_mean": 1000 * float(np.mean(self.server_queue_seconds)),
            "server_run_ms_mean": 1000 * float(np.mean(self.server_run_seconds)),
        }


def log(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)  # this script, or one using it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m teaserve serve` in a subprocess on a free port of 127.0.0.1, its output in a log file."""

    def __init__(self, arguments: list[str], environment: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "teaserve", "serve", *arguments, "--host", "127.0.0.1"]
        with log_path.open("w") as output:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), "--log-level", "warning"],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def log_tail(self, characters: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def model_card(self) -> dict[str, Any]:
        (card,) = httpx.get(f"{self.url}/v1/models", timeout=10).raise_for_status().json()["data"]
        return card

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (the server drains and exits), then SIGKILL after `grace` seconds; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@dataclass(frozen=True)
class Workload:
    model: str
    prompts: list[str]
    size: str
    steps: int | None
    """num_inference_steps of every request; None: the model's default."""
    requests: int
    concurrency: tuple[int, ...]

    def request(self, index: int) -> tuple[str, int]:
        """(prompt, seed) of request `index`: the same in every mode and level."""
        return self.prompts[index % len(self.prompts)], index

    @property
    def distinct_prompts(self) -> list[str]:
        """The prompts the requests ask for."""
        return self.prompts[: self.requests]

    def description(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": self.size,
            "steps": self.steps or "model default",
            "requests_per_level": self.requests,
            "concurrency": list(self.concurrency),
            "distinct_prompts": len(self.distinct_prompts),
            "seeds": "the request's index",
        }


def decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


async def generate(client: openai.AsyncOpenAI, workload: Workload, prompt: str, seed: int) -> Any:
    extra: dict[str, Any] = {"seed": seed}
    if workload.steps is not None:
        extra["num_inference_steps"] = workload.steps
    return await client.images.generate(
        model=workload.model, prompt=prompt, size=workload.size, response_format="b64_json", extra_body=extra
    )


async def run_level(client: openai.AsyncOpenAI, workload: Workload, concurrency: int) -> Level:
    """`concurrency` clients send the workload's requests back to back, each taking the next one not yet sent."""
    level = Level(concurrency)
    pending = iter(range(workload.requests))

    async def one_client() -> None:
        for index in pending:  # a shared iterator: each index goes to exactly one client
            prompt, seed = workload.request(index)
            started = time.perf_counter()
            result = await generate(client, workload, prompt, seed)
            level.latencies.append(time.perf_counter() - started)
            (image,) = result.data
            if image.b64_json is None:
                raise RuntimeError(f"request {index} came back without b64_json")
            level.images[index] = decode_png(image.b64_json)
            server_metrics = (result.model_extra or {})["metrics"]  # teaserve's extra field: the engine's timings
            level.server_queue_seconds.append(server_metrics["queue_seconds"])
            level.server_run_seconds.append(server_metrics["seconds"])

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    level.seconds = time.perf_counter() - started
    return level


async def warm_up(client: openai.AsyncOpenAI, workload: Workload) -> None:
    """One request per distinct prompt, at the highest concurrency, with seeds no measured request uses."""
    prompts = iter(workload.distinct_prompts)

    async def one_client() -> None:
        for prompt in prompts:
            await generate(client, workload, prompt, workload.requests + 1)

    await asyncio.gather(*(one_client() for _ in range(max(workload.concurrency))))


async def measure_mode(server: Server, workload: Workload, timeout: float) -> list[Level]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=timeout
    ) as client:
        await warm_up(client, workload)
        levels = []
        for concurrency in workload.concurrency:
            levels.append(await run_level(client, workload, concurrency))
            summary = levels[-1].summary()
            log(
                f"  concurrency {concurrency}: {summary['requests_per_second']:.2f} req/s, "
                f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms"
            )
        return levels


def identity(
    results: dict[str, list[Level]], tolerance: int, reference_level: tuple[str, int] = REFERENCE
) -> dict[str, Any]:
    """Every image against the solo reference image of the same request ((mode, concurrency) `reference_level`)."""
    reference_mode, reference_concurrency = reference_level
    (reference,) = [level for level in results[reference_mode] if level.concurrency == reference_concurrency]
    per_level: list[dict[str, Any]] = []
    for mode, levels in results.items():
        for level in levels:
            if (mode, level.concurrency) == reference_level:
                continue
            differences = [
                int(np.abs(image.astype(np.int16) - reference.images[index].astype(np.int16)).max())
                for index, image in sorted(level.images.items())
            ]
            per_level.append(
                {
                    "mode": mode,
                    "concurrency": level.concurrency,
                    "images": len(differences),
                    "max_abs_diff": max(differences),
                    "identical": sum(difference == 0 for difference in differences),
                    "over_tolerance": sum(difference > tolerance for difference in differences),
                }
            )
    return {
        "reference": {"mode": reference_mode, "concurrency": reference_concurrency},
        "tolerance": tolerance,
        "images": sum(row["images"] for row in per_level),
        "max_abs_diff": max(row["max_abs_diff"] for row in per_level),
        "over_tolerance": sum(row["over_tolerance"] for row in per_level),
        "per_level": per_level,
    }


def speedups(modes: dict[str, Any], base: str = "off", other: str = "on") -> list[dict[str, Any]]:
    """Requests per second of mode `other` over mode `base` (batching on over off), at each concurrency."""
    off = {level["concurrency"]: level for level in modes[base]["levels"]}
    return [
        {
            "concurrency": level["concurrency"],
            "speedup": level["requests_per_second"] / off_level["requests_per_second"],
        }
        for level in modes[other]["levels"]
        if (off_level := off.get(level["concurrency"]))
    ]


def format_table(
    document: dict[str, Any], faster: str = "on", ratio: str = "on/off", reference: str = "batching off at 1 client"
) -> str:
    """The levels of every mode, with the `faster` mode's speedup in column `ratio`, and the identity check."""
    speedup = {row["concurrency"]: row["speedup"] for row in document.get("speedup", [])}
    lines = [
        f"{'mode':<14} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {ratio:>7}",
    ]
    for name, mode in document["modes"].items():
        for level in mode.get("levels", []):
            measured = speedup.get(level["concurrency"]) if name == faster else None
            shown = f"{measured:.2f}x" if measured is not None else ""
            lines.append(
                f"{mode['label']:<14} {level['concurrency']:>7} {level['requests_per_second']:>8.2f} "
                f"{level['p50_ms']:>8.0f} {level['p99_ms']:>8.0f} {shown:>7}"
            )
    if "identity" in document:
        check = document["identity"]
        lines.append(
            f"\nidentity against {reference}: {check['images']} images, largest pixel difference "
            f"{check['max_abs_diff']}, {check['over_tolerance']} over {check['tolerance']}"
        )
    return "\n".join(lines)


def server_arguments(args: argparse.Namespace) -> list[str]:
    """The server flags common to both modes."""
    arguments = [args.model] if args.model else []
    for flag, value in (
        ("--cache-backend", args.cache_backend),
        ("--cache-config", args.cache_config),
        ("--device", args.device),
        # each client has one request in the server at a time: a queue that holds them all never answers 429
        ("--max-queue-size", str(max(16, *args.concurrency))),
    ):
        if value is not None:
            arguments += [flag, value]
    return arguments


def run(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Fills `document` as it goes: what was measured before an error stays in it."""
    modes = [
        Mode("off", "batching off", ("--max-batch-size", "1")),
        Mode(
            "on",
            "batching on",
            ("--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)),
        ),
    ]
    environment = dict(os.environ)
    if args.torch_threads is not None:
        environment["OMP_NUM_THREADS"] = str(args.torch_threads)  # torch's intra-op threads at start-up
    document["server"] = {"arguments": server_arguments(args), "torch_threads": args.torch_threads or "default"}
    results = measure_modes(args, modes, environment, document)
    document["speedup"] = speedups(document["modes"])
    document["identity"] = identity(results, args.tolerance)


def measure_modes(
    args: argparse.Namespace, modes: list[Mode], environment: dict[str, str], document: dict[str, Any]
) -> dict[str, list[Level]]:
    """One server per mode, in turn (`server_arguments` plus the mode's flags): started, measured at every level
    and stopped. Fills document["modes"] (and "smoke", "workload") as it goes."""
    document["smoke"] = args.smoke
    document["modes"] = {}
    results: dict[str, list[Level]] = {}
    workload: Workload | None = None
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            log(f"{mode.label}: starting `teaserve serve {' '.join(mode.server_flags)}`")
            record: dict[str, Any] = {"label": mode.label, "server_flags": list(mode.server_flags)}
            document["modes"][mode.name] = record
            started = time.perf_counter()
            server = Server(
                [*server_arguments(args), *mode.server_flags], environment, Path(folder) / f"{mode.name}.log"
            )
            try:
                server.wait_ready(args.startup_timeout)
                record["startup_seconds"] = time.perf_counter() - started
                if workload is None:
                    workload = build_workload(args, server.model_card())
                    document["workload"] = workload.description()
                results[mode.name] = asyncio.run(measure_mode(server, workload, args.request_timeout))
                record["levels"] = [level.summary() for level in results[mode.name]]
            finally:
                record["exit_status"] = server.stop()
    return results


def build_workload(args: argparse.Namespace, card: dict[str, Any]) -> Workload:
    prompts, _ = model_prompts(card["id"], held_out=True, prompts_file=args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: the prompts file is empty")
    return Workload(
        model=card["id"],
        prompts=prompts[: args.prompts],
        size=args.size or card["default_size"],
        steps=args.steps,
        requests=args.requests,
        concurrency=tuple(args.concurrency),
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def concurrency_list(text: str) -> list[int]:
    try:
        values = [positive_int(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}") from error
    return sorted(set(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model folder or hub id (default: the embedded model)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_STEPS} steps, {SMOKE_REQUESTS} requests per level, "
        f"concurrency {','.join(map(str, SMOKE_CONCURRENCY))}: checks the script",
    )
    parser.add_argument("--requests", type=positive_int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 8], help="comma-separated clients")
    parser.add_argument("--steps", type=positive_int, help="num_inference_steps (default: the model's)")
    parser.add_argument("--size", help="WxH (default: the model's default size)")
    parser.add_argument("--prompts", type=positive_int, default=16, help="distinct prompts, taken in turn")
    parser.add_argument("--prompts-file", help="one prompt per line (default: held-out captions of the embedded model)")
    parser.add_argument("--max-batch-size", type=positive_int, default=8, help="the server's, batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="the server's, batching on")
    parser.add_argument("--cache-backend", help="the server's (default: the model's own choice)")
    parser.add_argument("--cache-config", metavar="JSON", help="the server's")
    parser.add_argument("--device", help="the server's (default: its own choice)")
    parser.add_argument(
        "--torch-threads", type=positive_int, help="OMP_NUM_THREADS of the servers (default: torch's own choice)"
    )
    parser.add_argument("--tolerance", type=int, default=2, help="largest pixel difference (0..255) still identical")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a client waits for an answer")
    parser.add_argument("--json", help="write the JSON document to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.steps = SMOKE_REQUESTS, list(SMOKE_CONCURRENCY), SMOKE_STEPS
    if args.max_batch_size < 2:
        parser.error("--max-batch-size is the batching-on setting: at least 2")
    return args


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def report(
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace, dict[str, Any]], None],
    table: Callable[[dict[str, Any]], str],
) -> int:
    """Run `measure`, which fills a document as it goes; write the document to --json, print `table` of it.
    Returns 1 when the measurement failed (its error is in the document, with what was measured before it)."""
    started = time.perf_counter()
    document: dict[str, Any] = {}
    status = 0
    try:
        measure(args, document)
    except Exception as error:
        document["error"] = error_text(error)
        log(document["error"])
        status = 1
    document["elapsed_seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if "modes" in document:
        print(table(document))
    print(f"elapsed: {document['elapsed_seconds']:.0f} s")
    return status


def main(argv: list[str] | None = None) -> int:
    return report(parse_args(argv), run, format_table)


if __name__ == "__main__":
    sys.exit(main())
