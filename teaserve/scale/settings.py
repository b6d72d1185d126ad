"""`ScaleSettings`: one teaserve deployment on Ray Serve, from `teaserve serve --ray` flags or a Serve config file."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import EngineArgs
from ..engine.args import setting_name
from ..server.app import check_server_settings


def _number(text: str) -> float:
    return float(text)


def _boolean(text: str) -> bool:
    """`true` or `false` (any case), as `serve run ... playground=false` gives it."""
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"must be true or false, got {text!r}")
    return value


@dataclass(frozen=True)
class ScaleSettings:
    """The engine settings every replica loads its model with, the HTTP settings of the ingress, and how many
    replicas run with which resources.

    A fixed number of replicas (`replicas`, default 1), or autoscaling between `min_replicas` (default 1) and
    `max_replicas`, starting from `replicas` when given. Each replica reserves `replica_cpus` CPUs, and runs torch
    with as many threads, and `replica_gpus` GPUs (None: one where the cluster has GPUs, else none).
    """

    engine: EngineArgs = field(default_factory=EngineArgs)
    served_model_name: str | None = None
    api_key: str | None = None
    max_body_mb: float = field(default=64.0, metadata={"type": _number})
    body_timeout: float = field(default=60.0, metadata={"type": _number})
    stall_timeout: float = field(default=120.0, metadata={"type": _number})
    shutdown_grace: float = field(default=30.0, metadata={"type": _number})
    playground: bool = field(default=True, metadata={"type": _boolean})
    replicas: int | None = field(default=None, metadata={"type": int})
    min_replicas: int | None = field(default=None, metadata={"type": int})
    max_replicas: int | None = field(default=None, metadata={"type": int})
    replica_cpus: float = field(default=1.0, metadata={"type": _number})
    replica_gpus: float | None = field(default=None, metadata={"type": _number})

    def __post_init__(self) -> None:
        check_server_settings(
            max_body_mb=self.max_body_mb,
            body_timeout=self.body_timeout,
            stall_timeout=self.stall_timeout,
            shutdown_grace=self.shutdown_grace,
        )
        if not isinstance(self.playground, bool):
            raise ValueError(f"{setting_name('playground')} must be true or false, got {self.playground!r}")
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{setting_name(name)} must be an integer of at least 1, got {value!r}")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError(f"autoscaling needs {setting_name('max_replicas')} too")
        if self.max_replicas is not None:
            low = self.min_replicas or 1
            if not low <= (self.replicas or low) <= self.max_replicas:
                raise ValueError(
                    f"the replica counts must satisfy min_replicas <= replicas <= max_replicas, got "
                    f"{low} <= {self.replicas or low} <= {self.max_replicas}"
                )
        if not _is_number(self.replica_cpus) or self.replica_cpus <= 0:
            raise ValueError(f"{setting_name('replica_cpus')} must be a number above 0, got {self.replica_cpus!r}")
        if self.replica_gpus is not None and (not _is_number(self.replica_gpus) or self.replica_gpus < 0):
            raise ValueError(
                f"{setting_name('replica_gpus')} must be a number of at least 0, got {self.replica_gpus!r}"
            )

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def torch_threads(self) -> int:
        """The torch threads of a replica: one per CPU it reserves."""
        return max(1, math.floor(self.replica_cpus))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, *, api_key: str | None = None) -> ScaleSettings:
        """The settings of `teaserve serve --ray`; `api_key` is the key resolved from the flag or environment."""
        engine = EngineArgs.from_cli_args(args)
        given = {
            spec.name: getattr(args, spec.name)
            for spec in dataclasses.fields(cls)
            if getattr(args, spec.name, None) is not None  # a flag not given keeps the setting's default
        }
        given["engine"] = dataclasses.replace(engine, model=_shared_path(args.model))
        return cls(**{**given, "api_key": api_key})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ScaleSettings:
        """The settings of a Serve config file's `args`: the names of `teaserve serve`'s flags in snake_case
        (`model`, `cache_backend`, `max_queue_size`, `max_replicas`, ...). A text value is read as on the command
        line ("2", '{"rel_l1_thresh": 0.2}', request_timeout "0" for no limit); other values are taken as they are."""
        own = {spec.name: spec for spec in dataclasses.fields(cls) if spec.name != "engine"}
        engine_fields = {spec.name: spec for spec in dataclasses.fields(EngineArgs) if spec.name in _engine_options()}
        scale_values: dict[str, Any] = {}
        engine_values: dict[str, Any] = {}
        for name, value in options.items():
            spec = own.get(name) or engine_fields.get(name)
            if spec is None:
                valid = ", ".join(sorted([*own, *engine_fields]))
                raise ValueError(f"unknown teaserve setting {name!r}; valid settings: {valid}")
            target = scale_values if name in own else engine_values
            target[name] = _from_text(name, value, spec.metadata.get("type"))
        if "model" in engine_values:
            engine_values["model"] = _shared_path(engine_values["model"])
        return cls(engine=EngineArgs(**engine_values), **scale_values)


def _engine_options() -> set[str]:
    """The EngineArgs fields a deployment sets: the model and those with a flag."""
    return {"model", *(spec.name for spec in dataclasses.fields(EngineArgs) if "help" in spec.metadata)}


def _from_text(name: str, value: Any, convert: Callable[[str], Any] | None) -> Any:
    if not isinstance(value, str) or convert is None:
        return value
    try:
        return convert(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{setting_name(name)}: {error}") from None


def _shared_path(model: Any) -> Any:
    """A model folder given relative to here, made absolute: replicas run in other working directories."""
    if isinstance(model, str) and Path(model).exists():
        return str(Path(model).resolve())
    return model


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
