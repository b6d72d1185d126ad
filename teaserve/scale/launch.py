"""`teaserve serve --ray`: start Ray (or join a cluster), deploy the application, serve until a signal."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading

from .settings import ScaleSettings

logger = logging.getLogger("teaserve.serve")

APP_NAME = "teaserve"
LOCAL_RAY_ENVIRONMENT = {
    # A Ray instance of this machine alone: its processes listen on the loopback interface only.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
RAY_EXTRA_MISSING = "--ray needs Ray Serve, an optional extra of teaserve: pip install 'teaserve[ray]'"


def serve_on_ray(settings: ScaleSettings, *, host: str, port: int, address: str | None) -> int:
    """Serve `settings` on Ray until SIGTERM or Ctrl-C: on a Ray instance started here for this machine alone
    (`address` None), or on the cluster at `address` ("auto": the one `ray start` began on this machine).

    The first signal shuts Serve down (the replicas' running requests get `shutdown_grace` seconds); a second one
    interrupts that."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(RAY_EXTRA_MISSING)
    if address is None:
        for name, value in LOCAL_RAY_ENVIRONMENT.items():  # read when ray is imported
            os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from .app import build

    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        if address is None:
            check_fits(settings, ray.cluster_resources())
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings), name=APP_NAME, route_prefix="/")
        replicas = f"{settings.min_replicas or 1} to {settings.max_replicas}" if settings.autoscaling else None
        logger.info(
            "serving %s with %s engine replica(s) on http://%s:%d",
            settings.engine.model or "the embedded model",
            replicas or settings.replicas or 1,
            host,
            port,
        )
        wait_for_signal()
        logger.info("shutting down: Serve stops its replicas")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def check_fits(settings: ScaleSettings, resources: dict[str, float]) -> None:
    """Refuse replicas that this machine cannot hold: Serve would wait for them forever."""
    count = settings.replicas or settings.min_replicas or 1
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if count * settings.replica_cpus > cpus:
        raise ValueError(
            f"{count} replica(s) of {settings.replica_cpus:g} CPUs each do not fit on this machine's {cpus:g} CPUs; "
            "lower --replicas or --replica-cpus"
        )
    if settings.replica_gpus is not None and count * settings.replica_gpus > gpus:
        raise ValueError(
            f"{count} replica(s) of {settings.replica_gpus:g} GPUs each do not fit on this machine's {gpus:g} GPUs; "
            "lower --replicas or --replica-gpus"
        )
    if settings.replica_gpus is None and gpus >= 1 and count > gpus:
        raise ValueError(f"{count} replicas of one GPU each do not fit on this machine's {gpus:g} GPUs")


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT; the handlers are back to the defaults afterwards."""
    received = threading.Event()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, lambda *_: received.set()) for number in handled}
    try:
        while not received.wait(1.0):
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
