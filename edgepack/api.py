"""edgepack's Python API: what the command line calls, for a program to call.

    >>> import edgepack                                                   # doctest: +SKIP
    >>> result = edgepack.build("teacher/", "data.csv", "bundle/", max_drop=1.0)  # doctest: +SKIP
    >>> edgepack.load(result.bundle)("what is my balance")                 # doctest: +SKIP
    [{'label': 'balance', 'score': 0.97}]

A call prints nothing and leaves the process's logging and ``warnings`` as it found them: progress
lines are INFO records of the ``edgepack.<stage>`` loggers (and go to ``progress`` if given), library
warnings go to the build's ``build.log``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgepack.config import BuildConfig, DataConfig, ExportConfig, PackConfig
from edgepack.console import Log, Progress, capture
from edgepack.errors import EdgepackError
from runtime_shim.pipeline import OnnxPipeline

load = OnnxPipeline  # a bundle, ready to classify: ``edgepack.load(path)(texts)``

__all__ = ["BuildConfig", "BuildResult", "DataConfig", "PackConfig", "build", "build_config", "load", "pack"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What a build made: the bundle, its budgets and their verdicts, the shape search's frontier."""

    bundle: Path  # the published bundle directory
    build_dir: Path  # its stages, ledger, report (``report.html``) and ``summary.json``
    config: BuildConfig  # the resolved recipe (also ``build_dir/recipe.toml``)
    budgets: tuple[dict[str, Any], ...]  # each {"budget", "limit", "value", "ok"}
    budget_failures: tuple[str, ...]  # the missed budgets, one line each; empty when all passed
    frontier: dict[str, Any] | None  # every shape the search built, measured, and the one chosen
    ran: tuple[str, ...]  # the stages that ran (the others were up to date)
    summary: dict[str, Any]  # ``build_dir/summary.json``: the benchmark rows beside the teacher

    @property
    def ok(self) -> bool:
        """Every budget of the profile passed."""
        return not self.budget_failures

    @property
    def report(self) -> Path:
        return self.build_dir / "report.html"


def _data(data: str | Path | DataConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(data, DataConfig):
        return data.to_dict()
    if isinstance(data, Mapping):
        return dict(data)
    return {"source": str(data)}


def build_config(
    teacher: str | Path | None = None,
    data: str | Path | DataConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    recipe: str | BuildConfig | None = None,
    profile: str | Path | None = None,
    max_drop: float | None = None,
    **overrides: Any,
) -> BuildConfig:
    """The resolved config :func:`build` runs: ``recipe`` (a name in ``recipes/``, a recipe file, or a
    ``BuildConfig``; default ``"default"``) with the arguments laid over it. ``overrides`` are the
    recipe's own keys: top-level ones (``build_dir="..."``, ``skip=["tune"]``) or whole tables as
    dicts (``distill={"epochs": 3}``, ``search={"shapes": ["layers=1"]}``)."""
    from edgepack import recipes

    over: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in overrides.items()}
    for key, value in (("teacher", teacher), ("out", out), ("profile", profile)):
        if value is not None:
            over[key] = str(value)
    if data is not None:
        over["data"] = {**over.get("data", {}), **_data(data)}
    if max_drop is not None:
        over["search"] = {**over.get("search", {}), "max_drop": max_drop}
    try:
        if isinstance(recipe, BuildConfig):
            return recipe.merged(over)
        if recipe is not None and str(recipe).endswith(".toml"):
            base, path = recipes.read(recipe)
            return recipes.resolve(base, where=str(path)).merged(over)
        return recipes.resolve({**over, **({"recipe": recipe} if recipe else {})})
    except (TypeError, ValueError) as e:
        raise EdgepackError(str(e)) from None


def build(
    teacher: str | Path,
    data: str | Path | DataConfig | Mapping[str, Any],
    out: str | Path,
    *,
    recipe: str | BuildConfig | None = None,
    profile: str | Path | None = None,
    max_drop: float | None = None,
    progress: Log | None = None,
    force: bool = False,
    **overrides: Any,
) -> BuildResult:
    """Build (or resume) the verified bundle ``out`` from a fine-tuned classifier ``teacher`` and
    labelled ``data`` (a file or directory, see ``edgepack.data``; or a ``DataConfig``). ``teacher`` may be
    a hub id (``org/name``, ``org/name@revision``), read through the local hub cache when offline; the
    build records the revision (``result.summary["teacher"]``, ``BUILD/teacher.json``).

    ``profile``: the device (``profiles/``; default: this machine's). ``max_drop``: the accuracy points
    the bundle may lose against the teacher on validation. ``progress``: called with each progress
    line. A missed budget is in the result (``result.ok``, ``result.budget_failures``), not raised;
    bad input raises ``EdgepackError`` with one line saying what to change. The other keyword
    arguments are :func:`build_config`'s ``overrides``.
    """
    from edgepack.runner.build import build as run_build

    cfg = build_config(teacher, data, out, recipe=recipe, profile=profile, max_drop=max_drop, **overrides)
    summary = run_build(cfg, force=force, log=Progress("build", progress))
    root = Path(summary["build_dir"])
    manifest = json.loads((Path(summary["bundle"]) / "manifest.json").read_text())
    budgets = tuple((manifest.get("verified") or {}).get("budgets") or ())
    return BuildResult(
        bundle=Path(summary["bundle"]),
        build_dir=root,
        config=cfg,
        budgets=budgets,
        budget_failures=tuple(summary["budget_failures"]),
        frontier=summary.get("frontier"),
        ran=tuple(summary["ran"]),
        summary=summary,
    )


def pack(
    model: str | Path,
    data: str | Path | DataConfig | Mapping[str, Any],
    out: str | Path,
    *,
    target: str = "auto",
    writer: str = "auto",
    progress: Log | None = None,
    force: bool = False,
    **options: Any,
) -> Path:
    """Export, quantize and bundle the classifier directory ``model`` for ``target`` (``targets/``;
    default: this CPU's) into ``out``, checked against fp32 on ``data``; returns ``out``.

    ``options``: the quantize and bundle settings (``edgepack pack --help``: ``max_accuracy_drop``,
    ``eval_rows``, ``variants``, ``archive``...). A refused gate raises ``BudgetError`` and writes nothing.
    """
    from edgepack.runner.pack import pack as run_pack

    try:
        cfg = PackConfig.of(target=target, **options)
        data_cfg = DataConfig.from_dict(_data(data))
        export_cfg = ExportConfig(writer=writer)
    except (TypeError, ValueError) as e:
        raise EdgepackError(str(e)) from None
    with capture(None):
        run_pack(
            cfg,
            Path(model),
            data_cfg,
            Path(out),
            export_cfg=export_cfg,
            force=force,
            log=Progress("pack", progress),
        )
    return Path(out)
