"""Device profiles as data (``profiles/*.toml``): a target, the cores and memory a device has, the
thread settings to start from, and the budgets a bundle must meet there. Adding a device is adding
a file; ``check_budgets`` is the gate ``edgepack bench BUNDLE --profile NAME`` applies.

A profile file (every field is required except ``description`` and ``[threads]``)::

    target = "x86-64-vnni"
    physical_cores = 2
    memory_mb = 4096

    [budgets]
    p95_latency_ms = 10.0      # end-to-end single query (tokenize + run + softmax)
    peak_memory_mb = 400.0     # peak resident memory of the process serving the bundle
    bundle_size_mb = 40.0      # the whole bundle directory on disk
    max_accuracy_drop = 1.0    # points of accuracy the bundle may lose against its fp32 reference

    [threads]
    intra_op_num_threads = 1
    spinning = "on"
    graph_optimization_level = "all"
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import tomllib

from edgepack.config import ConfigBase, _choice, _in_range
from edgepack.errors import EdgepackError
from edgepack.resources import data_files
from runtime_shim.bench import result_value as _get  # one reader of harness results

SEARCH_PATH_ENV = "EDGEPACK_PROFILES_PATH"  # extra directories of profile files, os.pathsep-separated
SPINNING = ("on", "off", "force-stop")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")


@dataclasses.dataclass(frozen=True)
class Budgets(ConfigBase):
    """What a bundle must meet on the device. Latency and memory are measured where ``bench`` runs."""

    section: ClassVar[str] = "budgets"
    p95_latency_ms: float
    peak_memory_mb: float
    bundle_size_mb: float
    max_accuracy_drop: float  # accuracy points vs the fp32 reference (1.0 = one point)
    # Accuracy points vs the teacher, on validation, under the same out-of-scope rule (plain accuracy
    # without an out-of-scope label); None: not budgeted. `edgepack build --max-drop` sets it.
    max_teacher_drop: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                _in_range(f"budgets.{f.name}", value, 0.0, lo_open=not f.name.startswith("max_"))


@dataclasses.dataclass(frozen=True)
class ThreadDefaults(ConfigBase):
    """Session settings to start from before ``edgepack tune`` measures the device."""

    section: ClassVar[str] = "threads"
    intra_op_num_threads: int = 1
    spinning: str = "on"  # on: workers spin between ops; off: they sleep; force-stop: spin, stop after each run
    graph_optimization_level: str = "all"

    def __post_init__(self) -> None:
        _in_range("threads.intra_op_num_threads", self.intra_op_num_threads, 1)
        _choice("threads.spinning", self.spinning, SPINNING)
        _choice("threads.graph_optimization_level", self.graph_optimization_level, GRAPH_LEVELS)

    def runtime_settings(self) -> dict[str, Any]:
        """These defaults as ``runtime.json`` keys (the shim applies them through SessionOptions)."""
        return {"intra_op_num_threads": self.intra_op_num_threads,
                "graph_optimization_level": self.graph_optimization_level,
                "session_config": spinning_config(self.spinning)}


def spinning_config(spinning: str) -> dict[str, str]:
    """ORT session config entries for a spinning choice (``SPINNING``)."""
    _choice("spinning", spinning, SPINNING)
    if spinning == "off":
        return {"session.intra_op.allow_spinning": "0"}
    if spinning == "force-stop":
        return {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    return {"session.intra_op.allow_spinning": "1"}


@dataclasses.dataclass(frozen=True)
class Profile(ConfigBase):
    """A device or device class."""

    target: str
    physical_cores: int
    memory_mb: int
    budgets: Budgets
    name: str = ""
    description: str = ""
    threads: ThreadDefaults = dataclasses.field(default_factory=ThreadDefaults)

    def __post_init__(self) -> None:
        _in_range("physical_cores", self.physical_cores, 1)
        _in_range("memory_mb", self.memory_mb, 1)
        if self.threads.intra_op_num_threads > self.physical_cores:
            raise ValueError(f"threads.intra_op_num_threads={self.threads.intra_op_num_threads} is above the "
                             f"{self.physical_cores} physical cores; hyperthreads slow ORT's int8 kernels down")


def available() -> dict[str, Path]:
    """Profile names (file stems) to files; earlier search directories win."""
    return data_files("profiles", SEARCH_PATH_ENV)


HOST = "host"
# The host profile's budgets: an interactive classifier on a small machine (the edge-x86-2core file's).
HOST_BUDGETS = Budgets(p95_latency_ms=20.0, peak_memory_mb=400.0, bundle_size_mb=40.0, max_accuracy_drop=1.0)


def _memory_mb() -> int:
    try:
        return max(1, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20)
    except (AttributeError, OSError, ValueError):
        return 4096


def host_profile() -> Profile:
    """A profile of this machine: the target its CPU flags match (``targets.detect``), its physical
    cores (hyperthreads excluded) and memory; budgets of an interactive classifier (``HOST_BUDGETS``).
    ``load("host")`` returns it unless a ``profiles/host.toml`` exists.

    >>> p = host_profile()  # doctest: +SKIP
    >>> p.name, p.target, p.physical_cores  # doctest: +SKIP
    ('host', 'x86-64-avx2', 2)
    """
    from runtime_shim.cpu import physical_cores

    from . import targets

    target = targets.detect()
    cores = physical_cores()
    return Profile(target=target.name, physical_cores=cores, memory_mb=_memory_mb(), budgets=HOST_BUDGETS,
                   name=HOST, description=f"this machine: target {target.name} (from its CPU flags), "
                   f"{cores} physical core(s)")


def load(name: str) -> Profile:
    """A profile by name (``profiles/<name>.toml``) or path; one-line errors naming the file and field.
    ``host`` (without such a file) is this machine's profile (``host_profile``)."""
    files = available()
    if name == HOST and HOST not in files:
        return host_profile()
    path = Path(name) if name.endswith(".toml") else files.get(name)
    if path is None or not path.is_file():
        raise EdgepackError(f"unknown profile '{name}'; known profiles: {', '.join(files) or 'none'} "
                            f"(or add profiles/{name}.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"{path}: not valid TOML ({e})") from None
    try:
        _check_fields(Profile, data)
        profile = Profile.from_dict(data, where=str(path))
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise EdgepackError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    from edgepack import targets

    if profile.target not in targets.available():
        raise EdgepackError(f"{path}: target '{profile.target}' is not a known target; "
                            f"known targets: {', '.join(targets.available())}")
    return profile if profile.name else profile.replace(name=path.stem)


load_profile = load  # the name edgepack.commands.bench imports


def all_profiles() -> list[Profile]:
    return [load(n) for n in available()]


def _check_fields(cls: type[ConfigBase], data: Mapping[str, Any], prefix: str = "") -> None:
    """Name the first missing or mistyped field (``ConfigBase.from_dict`` names unknown keys)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            if required:
                where = f"[{prefix[:-1]}] " if prefix else ""
                unknown = sorted(set(data) - names)
                hint = f" (unknown key {', '.join(unknown)}: a typo?)" if unknown else ""
                raise ValueError(f"missing field {where}{f.name}{hint}")
            continue
        value, hint = data[f.name], hints[f.name]
        if isinstance(hint, type) and issubclass(hint, ConfigBase):
            if not isinstance(value, dict):
                raise ValueError(f"field {key} must be a table ([{key}]), got {value!r}")
            _check_fields(hint, value, prefix=f"{key}.")
        elif not _type_ok(value, hint):
            raise ValueError(f"field {key} must be {_type_name(hint)}, got {value!r}")


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) in (tuple, list):
        return isinstance(value, list)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(hint, str(hint))


# ------------------------------------------------------------------------------------------ budgets


@dataclasses.dataclass(frozen=True)
class BudgetCheck:
    budget: str  # the profile field, e.g. "p95_latency_ms"
    limit: float
    value: float | None  # None: the results did not measure it
    ok: bool

    def line(self) -> str:
        """``max_accuracy_drop: -0.2 (a gain) <= 1``: a negative drop means the bundle scored higher.

        >>> BudgetCheck("max_accuracy_drop", 1.0, -0.2, True).line()
        'max_accuracy_drop: -0.2 (a gain) <= 1'
        """
        shown = "not measured" if self.value is None else f"{self.value:.3g}"
        if self.budget in ("max_accuracy_drop", "max_teacher_drop") and self.value is not None and self.value < 0:
            shown += " (a gain)"
        return f"{self.budget}: {shown} {'<=' if self.ok else 'exceeds' if self.value is not None else 'vs'} {self.limit:g}"


def _points(x: float) -> float:
    # bench reports accuracy as a fraction (0.876); profiles speak in points (87.6)
    return x * 100.0 if abs(x) <= 1.0 else x


def _build_drop(results: Mapping[str, Any]) -> float | None:
    """The accuracy drop pack measured against fp32 on validation (manifest ``metrics``)."""
    metrics = results.get("build_metrics")
    if not isinstance(metrics, Mapping) and results.get("path"):
        manifest = Path(str(results["path"])) / "manifest.json"
        if manifest.is_file():
            try:
                metrics = json.loads(manifest.read_text()).get("metrics")
            except (OSError, ValueError):
                metrics = None
    drop = _get(metrics, "validation.accuracy_drop_points") if isinstance(metrics, Mapping) else None
    return None if drop is None else float(drop)


def measured(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The four budgeted quantities from a bench result (``edgepack bench --json`` keys):
    ``latency_ms.p95``, ``peak_rss_mb``, ``bundle_bytes``, and the accuracy drop in points: the
    result's ``accuracy_drop``, else ``reference_accuracy - accuracy`` (the fp32 or teacher model on
    the same split), else the drop ``pack`` measured against fp32 on validation (``build_metrics`` or
    the ``manifest.json`` of the bundle at ``path``)."""
    p95 = _get(results, "latency_ms.p95")
    rss = _get(results, "peak_rss_mb")
    size = _get(results, "bundle_bytes")
    teacher_drop = _get(results, "teacher_drop")
    drop = _get(results, "accuracy_drop")
    if drop is None:
        acc, ref = _get(results, "accuracy"), _get(results, "reference_accuracy")
        if acc is not None and ref is not None:
            drop = _points(float(ref)) - _points(float(acc))
    if drop is None:
        drop = _build_drop(results)
    return {"p95_latency_ms": None if p95 is None else float(p95),
            "peak_memory_mb": None if rss is None else float(rss),
            "bundle_size_mb": None if size is None else float(size) / 1e6,
            "max_accuracy_drop": None if drop is None else float(drop),
            "max_teacher_drop": None if teacher_drop is None else float(teacher_drop)}


def budget_report(profile: Profile, results: Mapping[str, Any]) -> list[BudgetCheck]:
    """One check per budget; a budget the results did not measure counts as missed (a gate that
    cannot be checked must not pass silently)."""
    values = measured(results)
    checks = []
    for f in dataclasses.fields(Budgets):
        if getattr(profile.budgets, f.name) is None:
            continue  # not budgeted (max_teacher_drop without --max-drop)
        limit = float(getattr(profile.budgets, f.name))
        value = values[f.name]
        checks.append(BudgetCheck(f.name, limit, value, value is not None and value <= limit))
    return checks


def check_budgets(profile: Profile, results: Mapping[str, Any]) -> list[str]:
    """The budgets of ``profile`` that ``results`` miss, one line each (empty: all met).

    >>> check_budgets(load("edge-x86-2core"), {"latency_ms": {"p95": 3.1}, "peak_rss_mb": 180,
    ...               "bundle_bytes": 23_000_000, "accuracy_drop": 0.1})
    []
    """
    return [f"profile '{profile.name}' budget missed: {c.line()}" for c in budget_report(profile, results) if not c.ok]
