"""Recipes are data: every file resolves, the default one is named in --help, a user's recipe starts
from the one it names, an old [pack] table still loads, and bad names get one line."""

from __future__ import annotations

import pytest
import tomllib

from edgepack import recipes
from edgepack.cli import main, make_parser
from edgepack.config import BuildConfig
from edgepack.errors import EdgepackError, ExitCode


def test_every_recipe_resolves_and_says_where_its_figures_come_from():
    names = recipes.available()
    assert {"default", "two-layer", "demo"} <= set(names)
    for name, path in names.items():
        cfg = recipes.load(name)
        assert isinstance(cfg, BuildConfig) and cfg.recipe == name
        assert recipes.describe(path), f"{path}: the first comment line is the recipe's summary"
        assert "measured" in path.read_text().lower(), f"{path}: say what the values were measured on"


def test_dataclass_defaults_are_plain_and_the_recipe_holds_the_measured_shape():
    plain, default = BuildConfig(), recipes.load("default")
    assert plain.distill.num_layers == 2 and plain.prune.heads_fraction is None and not plain.quantize.variants
    assert default.distill.num_layers == 1 and default.prune.heads_fraction == 1 / 3
    assert default.prune.recovery.epochs == 6 and default.quantize.variants and default.export.embedding == "gather"
    two = recipes.load("two-layer")  # starts from default, changes only what it names
    assert two.distill.num_layers == 2 and two.quantize.embedding_bits == 4 and two.prune.keep_chars == "latin"


def test_build_help_names_the_default_recipe(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "--help"])
    assert "default" in capsys.readouterr().out


def test_recipes_command_lists_and_shows(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "(default)" in out and "two-layer" in out
    assert main(["recipes", "two-layer"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["distill"]["num_layers"] == 2 and shown["recipe"] == "two-layer"


def test_unknown_recipe_is_one_line(capsys):
    assert main(["recipes", "three-layer"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "three-layer" in err and "default" in err


def test_old_pack_table_goes_to_quantize_and_bundle():
    cfg = recipes.resolve({"pack": {"max_accuracy_drop": 2.0, "eval_rows": 20, "variants": False}})
    assert cfg.quantize.max_accuracy_drop == 2.0 and cfg.bundle.eval_rows == 20 and not cfg.quantize.variants
    with pytest.raises(EdgepackError, match="eval_rowz"):
        recipes.resolve({"pack": {"eval_rowz": 20}})


def test_recipes_that_start_from_each_other_in_a_circle_are_refused(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text('# a\nrecipe = "b"\n')
    (tmp_path / "b.toml").write_text('# b\nrecipe = "a"\n')
    monkeypatch.setenv(recipes.SEARCH_PATH_ENV, str(tmp_path))
    with pytest.raises(EdgepackError, match="circle"):
        recipes.load("a")
