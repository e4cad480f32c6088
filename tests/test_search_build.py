"""The shape search of edgepack build on the tiny teacher: candidates built and measured, early stop,
one distilled student per depth, the frontier in the report, --pick without retraining, and the
budget against the teacher as a profile budget (exit 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.errors import ExitCode
from edgepack.runner import probe
from tests.test_build import RECIPE, loose_profile

pytestmark = pytest.mark.slow

SEARCH = """
[search]
max_drop = {max_drop}
explore = {explore}
latency_runs = 20
latency_rounds = 2
shapes = ["layers=1 heads=1/2 ffn=1/2", "layers=1 heads=1 ffn=1", "layers=2 heads=1/2 ffn=1/2"]
"""


def write(path: Path, tiny_model, clinc_json, *, max_drop=100.0, explore=1) -> Path:
    text = RECIPE.split("[search]")[0].format(teacher=tiny_model, out=path.parent / "bundle", data=clinc_json,
                                              profile=loose_profile(path.parent), recover_epochs=1, quantize_extra="")
    path.write_text(text + SEARCH.format(max_drop=max_drop, explore=explore))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model, clinc_json):
    root = tmp_path_factory.mktemp("search")
    recipe = write(root / "recipe.toml", tiny_model, clinc_json)
    assert main(["build", str(recipe)]) == 0
    return root, recipe


def frontier(root: Path) -> dict:
    return json.loads((root / "bundle.build" / "search" / "frontier.json").read_text())


def test_search_builds_cheap_first_and_stops_after_explore(searched):
    root, _ = searched
    f = frontier(root)
    cands = f["candidates"]
    # Tried in the cost model's order: the untrained graphs' p50, the recipe's order within the noise
    # (recomputed here from the recorded timings, whatever they were).
    predicted = {c["name"]: {"p50_ms": c["predicted_p50_ms"], "noise_ms": c["predicted_noise_ms"]} for c in cands}
    assert f["order"] == "latency"
    assert [c["name"] for c in cands] == probe.order(["L1-h0.5-f0.5", "L1-h1-f1", "L2-h0.5-f0.5"], predicted)
    # max_drop 100: the first shape tried is inside; explore = 1 builds one more; the third is skipped.
    assert [c["status"] for c in cands] == ["built", "built", "skipped (a cheaper shape is inside the budget)"]
    assert f["objective"] == "p95" and f["confidence"] == 0.95
    for c in cands[:2]:
        assert c["inside"] and c["p50_ms"] > 0 and c["bundle_bytes"] > 0
        assert 0 < c["p50_ms"] <= c["p95_ms"] and c["mean_ms"] > 0
        assert abs(f["teacher_validation_accuracy"] - c["validation_accuracy"] - c["teacher_drop"]) < 1e-9
        # paired on the same validation rows: the interval holds the point estimate, and 100 points is inside
        assert len(c["correct"]) == len(f["teacher_correct"]) > 0
        assert c["drop_low"] - 1e-6 <= c["teacher_drop"] <= c["drop_high"] + 1e-6
        assert (c["verdict"], c["verdict_text"]) == ("inside", "inside the budget")
        # the reach rule ran (a budget is set) and let every epoch be trained
        record = json.loads((root / "bundle.build" / "candidates" / c["name"] / "distill" / "stage.json").read_text())
        assert record["metrics"]["reach"]["stopped"] is None and c["reach"] is None
        # the probe timed beside its bundle in the same rounds; its error is recorded
        assert c["probe_error"] == pytest.approx(c["probe_p50_ms"] / c["p50_ms"] - 1, abs=1e-4)
    assert f["latency_model"]["shapes"] == 2
    assert f["latency_model"]["max_abs"] == pytest.approx(max(abs(c["probe_error"]) for c in cands[:2]), abs=1e-4)
    assert f["chosen"] in predicted and "cpu" in f


def test_probes_are_the_shapes_untrained(searched):
    """Every shape (the skipped one too) has a probe: its graph has the shape's layers and heads, the
    probes of one depth share one untrained student, and nothing in them was trained."""
    from edgepack.stages.quantize.formats import count_ops

    root, _ = searched
    probes = root / "bundle.build" / "probes"
    assert sorted(p.name for p in probes.iterdir()) == ["L1-h0.5-f0.5", "L1-h1-f1", "L2-h0.5-f0.5"]
    attention = {n: count_ops(probes / n / "quantize" / "model.quant.onnx").get("QAttention", 0) for n in
                 ("L1-h0.5-f0.5", "L2-h0.5-f0.5")}
    assert attention["L2-h0.5-f0.5"] == 2 * attention["L1-h0.5-f0.5"] > 0
    a = next((probes / "L1-h0.5-f0.5" / "distill").glob("*.safetensors"))
    assert os.stat(a).st_ino == os.stat(probes / "L1-h1-f1" / "distill" / a.name).st_ino
    record = json.loads((probes / "L1-h0.5-f0.5" / "distill" / "stage.json").read_text())
    assert record["metrics"]["trained"] is False
    pruned = json.loads((probes / "L1-h0.5-f0.5" / "prune" / "stage.json").read_text())
    assert [s["step"] for s in pruned["metrics"]["steps"]] == ["input", "vocab", "structured"]  # no recovery
    assert pruned["config"]["prune"]["heads_per_layer"][0] * 2 == json.loads(
        (probes / "L1-h1-f1" / "prune" / "stage.json").read_text())["config"]["prune"]["heads_per_layer"][0]


def test_shapes_of_one_depth_share_one_distilled_student(searched):
    root, _ = searched
    cands = root / "bundle.build" / "candidates"
    a = next((cands / "L1-h0.5-f0.5" / "distill").glob("*.safetensors"))
    b = cands / "L1-h1-f1" / "distill" / a.name
    assert os.stat(a).st_ino == os.stat(b).st_ino  # hard-linked from the first candidate, not retrained
    pruned = [json.loads((cands / n / "prune" / "stage.json").read_text())["config"]["prune"] for n in ("L1-h0.5-f0.5", "L1-h1-f1")]
    # recorded resolved: the fractions as heads per layer, so the two shapes pruned differently
    assert pruned[0]["heads_per_layer"] != pruned[1]["heads_per_layer"]
    assert pruned[0]["heads_per_layer"][0] * 2 == pruned[1]["heads_per_layer"][0]
    # the shape that cut heads was recovered; the one that kept everything was not retrained
    steps = [[st["step"] for st in json.loads((cands / n / "prune" / "stage.json").read_text())["metrics"]["steps"]]
             for n in ("L1-h0.5-f0.5", "L1-h1-f1")]
    assert steps[0][-1] == "recover" and "recover" not in steps[1]


def test_report_shows_the_frontier_and_the_budget(searched):
    root, _ = searched
    out = root / "bundle"
    md = (out / "report.md").read_text()
    assert "accuracy-latency frontier" in md and "L1-h1-f1" in md and "report_frontier.png" in md
    assert (out / "report_frontier.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    budgets = {b["budget"]: b for b in manifest["verified"]["budgets"]}
    assert budgets["max_teacher_drop"]["limit"] == 100.0 and budgets["max_teacher_drop"]["ok"]
    chosen = next(c for c in frontier(root)["candidates"] if c["name"] == frontier(root)["chosen"])
    assert budgets["max_teacher_drop"]["value"] == pytest.approx(chosen["teacher_drop"])


def test_pick_publishes_another_shape_without_retraining(searched, capsys):
    root, recipe = searched
    f = frontier(root)
    other = next(c["name"] for c in f["candidates"] if c["status"] == "built" and c["name"] != f["chosen"])
    capsys.readouterr()
    assert main(["build", str(recipe), "--pick", other]) == 0
    out = capsys.readouterr().out
    assert ": running" not in "\n".join(line for line in out.splitlines() if line.startswith("[L")), out
    assert frontier(root)["chosen"] == other
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    picked = json.loads((root / "bundle.build" / "candidates" / other / "bundle" / "manifest.json").read_text())
    assert manifest["files"]["model.quant.onnx"]["sha256"] == picked["files"]["model.quant.onnx"]["sha256"]
    assert main(["build", str(recipe), "--pick", "L9-h1-f1"]) == ExitCode.USAGE
    assert "L9-h1-f1" in capsys.readouterr().err


def test_objective_drives_the_choice_of_a_real_search(searched, capsys):
    """The same search rerun with objective = "p50": nothing retrains, the candidates are timed again, and
    the choice is choose_shape's by p50 over the figures frontier.json records; the log line of every
    candidate gives p50, mean and p95 and the drop's interval. The quantize stages rank their variants
    again by p50 (the recipe's [quantize] objective is at its default), the students are kept."""
    from edgepack.metrics import choose_shape
    from edgepack.runner.search import _rows

    root, recipe = searched
    p50 = recipe.with_name("p50.toml")
    p50.write_text(recipe.read_text().replace("[search]\n", '[search]\nobjective = "p50"\n'))
    capsys.readouterr()
    assert main(["build", str(p50)]) == 0
    out = capsys.readouterr().out
    assert "quantize: running (config changed: quantize.objective" in out and "distill: running" not in out, out
    f = frontier(root)
    assert f["objective"] == "p50"
    built = [c for c in f["candidates"] if c["status"] == "built"]
    rows = [{**c, "correct": _rows(c["correct"])} for c in built]
    assert f["chosen"] == choose_shape(rows, objective="p50")[0]
    for c in built:
        line = next(ln for ln in out.splitlines() if ln.startswith(f"[search] {c['name']} ") and "p95" in ln)
        assert "p50" in line and "mean" in line and "95% interval" in line
    assert "by p50" in (root / "bundle" / "report.md").read_text()


def test_bundle_outside_the_teacher_budget_exits_3(searched, tiny_model, clinc_json, monkeypatch, capsys):
    """The drop is measured for real; the bundle's validation accuracy is then lowered by 5 points so
    that it is outside a 1-point budget whatever the tiny random model scored (that is luck)."""
    from edgepack.stages import evaluate as verify

    real = verify.teacher_drop

    def worse(teacher, bundle, val, label_names):
        d = real(teacher, bundle, val, label_names)
        return {**d, "validation_accuracy": d["validation_accuracy"] - 5, "teacher_drop": d["teacher_drop"] + 5}

    root, _ = searched
    recipe = write(root / "strict.toml", tiny_model, clinc_json, max_drop=1.0, explore=0)
    monkeypatch.setattr(verify, "teacher_drop", worse)
    capsys.readouterr()
    code = main(["build", str(recipe), "--pick", frontier(root)["chosen"]])
    assert code == ExitCode.BUDGET
    assert "max_teacher_drop" in capsys.readouterr().err
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    check = next(b for b in manifest["verified"]["budgets"] if b["budget"] == "max_teacher_drop")
    assert not check["ok"] and check["limit"] == 1.0 and "max_teacher_drop" in (root / "bundle" / "report.md").read_text()


def test_bad_shape_is_one_clear_line(tmp_path, tiny_model, clinc_json, capsys):
    recipe = write(tmp_path / "r.toml", tiny_model, clinc_json)
    recipe.write_text(recipe.read_text().replace('"layers=1 heads=1 ffn=1"', '"layers=1 head=1"'))
    assert main(["build", str(recipe)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head=1" in err[0] and "layers" in err[0]


def test_bad_objective_is_one_clear_line(tmp_path, tiny_model, clinc_json, capsys):
    recipe = write(tmp_path / "r.toml", tiny_model, clinc_json)
    recipe.write_text(recipe.read_text().replace("[search]\n", '[search]\nobjective = "p99"\n'))
    assert main(["build", str(recipe)]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.objective" in err[0] and "p99" in err[0] and "p95" in err[0], err


REACH_SEARCH = """
[search]
max_drop = 1.0
explore = 0
order = "declared"
latency_runs = 20
latency_rounds = 2
shapes = ["layers=1 heads=1/2 ffn=1/2", "layers=2 heads=1/2 ffn=1/2"]
"""


def test_a_shape_that_cannot_reach_the_budget_stops_early(tmp_path, tiny_model, clinc_json, monkeypatch, capsys):
    """The teacher's accuracy is said to be 900 points higher than measured, so the target (it less 1 point)
    is above 100%, where no projection goes: each shape's real training is stopped after its first epoch of
    4, says so at once, and goes no further; with none left, the most accurate when stopped is carried on
    and published."""
    from edgepack.runner import search as search_mod

    real = search_mod.teacher_accuracy

    def lying(*a, **kw):
        acc, correct = real(*a, **kw)
        return acc + 900.0, correct

    monkeypatch.setattr(search_mod, "teacher_accuracy", lying)
    text = RECIPE.split("[search]")[0].format(teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json,
                                              profile=loose_profile(tmp_path), recover_epochs=1, quantize_extra="")
    assert "epochs = 1\nablation" in text
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text.replace("epochs = 1\nablation", "epochs = 4\nablation") + REACH_SEARCH)
    capsys.readouterr()
    assert main(["build", str(recipe)]) in (0, ExitCode.BUDGET)  # the bundle's real drop is the tiny model's luck
    out = capsys.readouterr().out.splitlines()
    f = frontier(tmp_path)
    cands = {c["name"]: c for c in f["candidates"]}
    for name, c in cands.items():
        assert c["reach"]["epochs_run"] == 1 < c["reach"]["epochs_configured"] == 4
        assert not c["reach"]["reachable"] and c["reach"]["projected"] < c["reach"]["target"]
        record = json.loads((tmp_path / "bundle.build" / "candidates" / name / "distill" / "stage.json").read_text())
        assert record["metrics"]["reach"]["stopped"]["epoch"] == 1 and len(record["metrics"]["reach"]["curve"]) == 1
        said = next(i for i, line in enumerate(out) if line.startswith(f"[search] {name} is out: cannot reach"))
        # said at once: before that shape's distill stage finished
        assert said < next(i for i, line in enumerate(out) if line.startswith(f"[{name} ") and "distill: done" in line)
    carried = max(cands.values(), key=lambda c: (c["reach"]["best"], -list(cands).index(c["name"])))
    other = next(c for c in cands.values() if c is not carried)
    assert other["status"] == "stopped: cannot reach" and other["why"]["search"].startswith("after epoch 1/4")
    assert not (tmp_path / "bundle.build" / "candidates" / other["name"] / "prune").exists()  # not carried on
    assert other["bundle"] is None and other["p95_ms"] is None
    assert carried["status"] == "built" and "carried on" in carried["why"]["search"] and f["chosen"] == carried["name"]
    assert any("the best reachable figure among them" in line for line in out)
    assert "stopped: cannot reach (after epoch 1/4" in (tmp_path / "bundle" / "report.md").read_text()


def test_a_cascade_does_not_inherit_a_stopped_student(tmp_path, tiny_model, clinc_json, monkeypatch):
    """The plain shape is stopped after one epoch (a target above 100%); the cascade of the same student,
    never stopped, trains its own to the end instead of taking the stopped one from the ledger."""
    from edgepack.runner import search as search_mod

    real = search_mod.teacher_accuracy
    monkeypatch.setattr(search_mod, "teacher_accuracy", lambda *a, **kw: (lambda r: (r[0] + 900.0, r[1]))(real(*a, **kw)))
    text = RECIPE.split("[search]")[0].format(teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json,
                                              profile=loose_profile(tmp_path), recover_epochs=1, quantize_extra="")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text.replace("epochs = 1\nablation", "epochs = 3\nablation") + REACH_SEARCH.replace(
        ', "layers=2 heads=1/2 ffn=1/2"]', ', "layers=1 heads=1/2 ffn=1/2 fallback=teacher"]'))
    assert main(["build", str(recipe)]) in (0, ExitCode.BUDGET)
    plain, casc = frontier(tmp_path)["candidates"]
    assert plain["status"] == "stopped: cannot reach" and casc["status"] == "built", (plain, casc)
    records = {c["name"]: json.loads((tmp_path / "bundle.build" / "candidates" / c["name"] / "distill" /
                                      "stage.json").read_text())["metrics"] for c in (plain, casc)}
    assert len(records[plain["name"]]["reach"]["curve"]) == 1
    assert "reach" not in records[casc["name"]]  # trained without the stop rule: every epoch
    a, b = (tmp_path / "bundle.build" / "candidates" / c["name"] / "distill" / "model.safetensors" for c in (plain, casc))
    assert a.stat().st_ino != b.stat().st_ino  # not the stopped student's files


CASCADE_SEARCH = """
[search]
max_drop = 100.0
explore = 1
order = "declared"
latency_runs = 20
latency_rounds = 2
shapes = ["layers=1 heads=1/2 ffn=1/2", "layers=1 heads=1/2 ffn=1/2 fallback=teacher"]
"""


def test_cascade_shape_reuses_its_student_and_ships_the_teacher(tmp_path, tiny_model, clinc_json):
    """A shape with fallback=teacher: the plain shape's bundle (taken from its ledger, not retrained) with
    the teacher's int8 bundle (built once, BUILD/fallback) inside it, escalating under the lowest point
    of the grid (a 100-point budget is reached by every point), and publishable with --pick."""
    from edgepack.stages.cascade import grid
    from runtime_shim import OnnxPipeline

    text = RECIPE.split("[search]")[0].format(teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json,
                                              profile=loose_profile(tmp_path), recover_epochs=1, quantize_extra="")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text + CASCADE_SEARCH)
    assert main(["build", str(recipe)]) == 0
    build = tmp_path / "bundle.build"
    f = frontier(tmp_path)
    plain, casc = f["candidates"]
    assert (plain["name"], casc["name"]) == ("L1-h0.5-f0.5", "L1-h0.5-f0.5+teacher")
    assert plain["status"] == casc["status"] == "built" and plain["sent_on"] is None
    cdir = build / "candidates" / casc["name"]
    # the student was distilled once: the cascade's distill output is the plain shape's (shared files)
    a, b = (build / "candidates" / plain["name"] / "distill" / "model.safetensors"), cdir / "distill" / "model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino
    fast, slow = OnnxPipeline(cdir / "bundle"), OnnxPipeline(build / "fallback" / "bundle")
    floor = max(t for t in (fast.oos_threshold, slow.oos_threshold, 0.0) if t is not None)
    runtime = json.loads((cdir / "cascade" / "runtime.json").read_text())
    assert runtime["cascade"] == {"fallback": "fallback", "below": grid(floor)[0]}
    manifest = json.loads((cdir / "cascade" / "manifest.json").read_text())
    assert casc["sent_on"] == manifest["metrics"]["cascade"]["sent_on_validation"]
    assert (cdir / "cascade" / "fallback" / "model.quant.onnx").read_bytes() == (
        build / "fallback" / "bundle" / "model.quant.onnx").read_bytes()
    assert main(["build", str(recipe), "--pick", casc["name"]]) == 0
    pipe = OnnxPipeline(tmp_path / "bundle")
    assert pipe.fallback is not None and pipe.escalate_below == grid(floor)[0]
    assert frontier(tmp_path)["chosen"] == casc["name"]


def test_shapes_train_on_the_process_threads_after_the_teacher_is_measured(tmp_path, tiny_model, clinc_json,
                                                                          monkeypatch):
    """The teacher's validation accuracy is measured on a one-thread PyTorch backend before any shape
    trains; the training after it still gets every thread the process had."""
    import torch

    from edgepack.training import distillation

    seen: list[int] = []
    real = distillation.train_student

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(distillation, "train_student", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["build", str(write(tmp_path / "recipe.toml", tiny_model, clinc_json, explore=0))]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2}, seen
