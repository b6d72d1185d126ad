"""Requests per second of `teaserve serve --ray` with one engine replica and with two, side by side in one run.

For each replica count one server starts as its own process on a free port, with a Ray instance of its own:
`teaserve serve --ray --replicas N --replica-cpus C` (C: `--replica-cpus`, default 1), so each replica reserves C
CPUs and runs torch on C threads, whatever the replica count. The replicas run one request at a time
(`--max-batch-size 1`, this script's default), so that the ratio is that of the replicas alone; give the server's
batching with `--max-batch-size 8` to measure both together. Each server is warmed up and measured as in
`throughput.py` (the same workload, the same OpenAI-SDK clients, the same latency figures): for every concurrency
(default 1 and 8 clients) the level's requests are sent back to back, request i asking for prompt i mod 16 with
seed i, so both replica counts generate the same (prompt, seed) set.

Identity: every image is compared with the same request's image from one replica at one client, the serial
regeneration; a request that fails ends the run with its error. The ratio is two replicas' requests per second over
one replica's, at each concurrency.

    python benchmarks/scale_out.py                     # the embedded model on the CPU: a few minutes
    python benchmarks/scale_out.py --json scale-out.json --requests 96 --concurrency 1,8
    python benchmarks/scale_out.py Qwen/Qwen-Image --device cuda --replica-cpus 4 --size 1024x1024
    python benchmarks/scale_out.py --smoke             # 2 steps, 4 requests at 1 and 2 clients
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import throughput
from throughput import (
    SMOKE_CONCURRENCY,
    SMOKE_REQUESTS,
    SMOKE_STEPS,
    Mode,
    concurrency_list,
    identity,
    measure_modes,
    positive_int,
    server_arguments,
    speedups,
)

REPLICA_COUNTS = ("1", "2")
REFERENCE = ("1", 1)
"""(replicas, clients) of the serial reference images."""


def run(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Fills `document` as it goes: what was measured before an error stays in it."""
    modes = [
        Mode(
            count,
            f"{count} replica{'s' if count != '1' else ''}",
            (
                "--ray",
                "--replicas",
                count,
                "--replica-cpus",
                f"{args.replica_cpus:g}",
                "--max-batch-size",
                str(args.max_batch_size),
            ),
        )
        for count in REPLICA_COUNTS
    ]
    document["server"] = {
        "arguments": server_arguments(args),
        "torch_threads_per_replica": max(1, int(args.replica_cpus)),  # as the replicas set them
    }
    results = measure_modes(args, modes, dict(os.environ), document)
    document["speedup"] = speedups(document["modes"], *REPLICA_COUNTS)
    document["identity"] = identity(results, args.tolerance, REFERENCE)


def format_table(document: dict[str, Any]) -> str:
    return throughput.format_table(document, faster=REPLICA_COUNTS[1], ratio="2/1", reference="1 replica at 1 client")


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
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 8], help="comma-separated clients")
    parser.add_argument("--steps", type=positive_int, help="num_inference_steps (default: the model's)")
    parser.add_argument("--size", help="WxH (default: the model's default size)")
    parser.add_argument("--prompts", type=positive_int, default=16, help="distinct prompts, taken in turn")
    parser.add_argument("--prompts-file", help="one prompt per line (default: held-out captions of the embedded model)")
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves, and its torch threads"
    )
    parser.add_argument("--max-batch-size", type=positive_int, default=1, help="the server's (default 1: no batching)")
    parser.add_argument("--cache-backend", help="the server's (default: the model's own choice)")
    parser.add_argument("--cache-config", metavar="JSON", help="the server's")
    parser.add_argument("--device", help="the server's (default: its own choice)")
    parser.add_argument("--tolerance", type=int, default=2, help="largest pixel difference (0..255) still identical")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a client waits for an answer")
    parser.add_argument("--json", help="write the JSON document to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.steps = SMOKE_REQUESTS, list(SMOKE_CONCURRENCY), SMOKE_STEPS
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1: one client on one replica gives the reference images")
    return args


def main(argv: list[str] | None = None) -> int:
    return throughput.report(parse_args(argv), run, format_table)


if __name__ == "__main__":
    sys.exit(main())
