"""edgepack's Python API on the tiny teacher: build, pack and load as a program calls them, leaving
the caller's logging and warnings as they were and printing nothing; the README's example runs."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
from test_build import loose_profile, write_recipe

import edgepack

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _logging_state():
    """The process-wide settings a library call must not change: the root logger, ``warnings``,
    the libraries' loggers, transformers' progress-bar switch (a "Loading weights" bar is hidden per
    load, not for the whole process) and torch's thread count."""
    import torch
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    libraries = [(n, logging.getLogger(n).level) for n in ("transformers", "optuna", "datasets", "onnxruntime")]
    return (root.level, list(root.handlers), list(root.filters), warnings.showwarning, list(warnings.filters),
            libraries, hf_logging.is_progress_bar_enabled(), torch.get_num_threads())


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model, clinc_json):
    """One pack and one build through the API, with the logging state and the output around them."""
    root = tmp_path_factory.mktemp("api")
    recipe = write_recipe(root / "tiny.toml", teacher=tiny_model, out=root / "unused", data=clinc_json)
    import torch

    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the teacher is timed at one thread: a build must not leave the caller's torch there
    before = _logging_state()
    packed = edgepack.pack(
        tiny_model, clinc_json, root / "packed", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20
    )
    after_pack = _logging_state()
    result = edgepack.build(
        tiny_model,
        clinc_json,
        root / "built",
        recipe=recipe,
        profile=loose_profile(root),
        progress=lines.append,
    )
    after_build = _logging_state()
    torch.set_num_threads(threads)
    return {"packed": packed, "result": result, "lines": lines, "states": (before, after_pack, after_build)}


def test_library_calls_leave_logging_and_warnings_as_they_found_them(made):
    before, after_pack, after_build = made["states"]
    assert after_pack == before and after_build == before


def test_a_library_call_prints_nothing(made, tmp_path, tiny_model, clinc_json, capfd):
    """Not a line on stdout or stderr (descriptor level: native code included), from a pack and from a
    build (resumed; its stages' output was checked by the first run); the progress goes to the
    callback and the ``edgepack.<stage>`` loggers."""
    capfd.readouterr()
    edgepack.pack(
        tiny_model, clinc_json, tmp_path / "b", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20
    )
    cfg = made["result"].config
    edgepack.build(cfg.teacher, cfg.data, made["result"].bundle, recipe=cfg)
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_build_returns_its_result_and_reports_progress(made, caplog):
    result = made["result"]
    assert isinstance(result, edgepack.BuildResult)
    assert (result.bundle / "manifest.json").is_file() and result.report.is_file()
    assert result.ok and result.budget_failures == () and result.budgets
    assert {b["budget"] for b in result.budgets} >= {"max_accuracy_drop"}
    assert result.ran[:2] == ("distill", "prune") and result.frontier is None
    assert result.config.distill.num_layers == 1
    assert any(line.startswith("[build 1/") and "distill: running" in line for line in made["lines"])
    assert edgepack.load(result.bundle)("what is my checking balance")[0]["label"]


def test_a_missed_budget_is_in_the_result_not_raised(made, tmp_path, tiny_model, clinc_json):
    """A resumed build (nothing retrained) against a profile no bundle meets: the result says which
    budget, the bundle is written, nothing is raised, and the records go to the named loggers."""
    result = made["result"]
    strict = loose_profile(tmp_path)
    strict.write_text(re.sub(r"p95_latency_ms = [0-9.]+", "p95_latency_ms = 0.000001", strict.read_text()))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("edgepack")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        missed = edgepack.build(
            result.config.teacher, result.config.data, result.bundle, recipe=result.config, profile=strict
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert not missed.ok and any("p95_latency_ms" in f for f in missed.budget_failures)
    assert (missed.bundle / "manifest.json").is_file()
    assert "distill" not in missed.ran
    stages = {r.name.partition(".")[2] for r in records if r.name.startswith("edgepack.")}
    assert {"build", "evaluate"} <= stages


def test_bad_input_raises_one_line(tmp_path, clinc_json):
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="no such directory"):
        edgepack.build(tmp_path / "nowhere", clinc_json, tmp_path / "out", recipe="none")
    with pytest.raises(EdgepackError, match="unknown key"):
        edgepack.build(tmp_path / "nowhere", clinc_json, tmp_path / "out", distill={"epoch": 3})


def test_readme_example_builds_loads_and_classifies(tmp_path, tiny_model, clinc_json, monkeypatch, made):
    """The README's Python example as written, the demo's teacher, data and recipe swapped for the
    tiny ones (the build resumes the module's: same teacher, data and recipe)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import edgepack\n.*?)```", readme, flags=re.S).group(1)
    assert len(block.strip().splitlines()) <= 5
    recipe = write_recipe(
        tmp_path / "tiny.toml",
        teacher=tiny_model,
        out=tmp_path / "unused",
        data=clinc_json,
        profile=loose_profile(tmp_path),
    )
    code = (
        block.replace('"edgepack-demo/teacher"', repr(str(tiny_model)))
        .replace('"edgepack/demo_data/assistant_intents.json"', repr(str(clinc_json)))
        .replace('recipe="demo"', f"recipe={str(recipe)!r}")
    )
    assert code != block
    monkeypatch.chdir(tmp_path)
    printed: list = []
    exec(compile(code, "README.md", "exec"), {"print": printed.append})
    assert printed and printed[0][0]["label"]


def _hub_cache(where: Path, model: Path, repo: str = "edgepack-tests/tiny") -> str:
    """A local hub cache holding ``model`` as ``repo``'s main revision (the layout snapshot_download reads)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = where / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_id_teacher_is_read_offline_and_its_revision_recorded(made, tmp_path, monkeypatch, tiny_model):
    """``org/name`` from a hub cache made here (offline: nothing is downloaded); the build reads the
    same weights as the tiny teacher's directory, so it resumes, and records the snapshot's commit."""
    import json

    import huggingface_hub.constants as hub

    commit = _hub_cache(tmp_path / "hub", tiny_model)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cfg = made["result"].config
    result = edgepack.build("edgepack-tests/tiny", cfg.data, made["result"].bundle, recipe=cfg)
    assert result.summary["teacher"] == {"hub_id": "edgepack-tests/tiny", "revision": commit}
    assert json.loads((result.build_dir / "teacher.json").read_text())["revision"] == commit
    assert "distill" not in result.ran  # the same teacher, by content
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="edgepack-tests/absent: no such directory, and not a hub model"):
        edgepack.build("edgepack-tests/absent", cfg.data, tmp_path / "out", recipe=cfg)
