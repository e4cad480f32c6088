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
    assert {"default", "clinc150", "two-layer", "demo"} <= set(names)
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
    clinc = recipes.load("clinc150")  # the CLINC150-measured shape and its English, Latin-script settings
    assert clinc.distill.num_layers == 1 and clinc.prune.heads_fraction == 1 / 3 and clinc.prune.recovery.epochs == 6
    assert clinc.prune.keep_chars == "latin" and clinc.data.max_length == 64 and clinc.distill.oos_relabel == 0.5
    two = recipes.load("two-layer")  # starts from clinc150, changes only what it names
    assert two.distill.num_layers == 2 and two.quantize.embedding_bits == 4 and two.prune.keep_chars == "latin"
    assert two.prune.recovery == clinc.prune.recovery and two.data == clinc.data
    assert recipes.load("demo").prune.keep_chars == "latin"  # its figures were measured with that shape


def test_default_recipe_is_dataset_neutral():
    """No script, length or out-of-scope class assumed: the characters and the length come from the
    data (the default keeps the CLINC150 recipe's starting shape, not its data settings)."""
    default, clinc = recipes.load("default"), recipes.load("clinc150")
    assert default.prune.keep_chars == "data" and default.data.max_length == 0
    assert default.data.oos_label is None  # found in the data when it has one, else none
    assert (default.distill.num_layers, default.prune.heads_fraction, default.prune.ffn_fraction) == (
        clinc.distill.num_layers, clinc.prune.heads_fraction, clinc.prune.ffn_fraction)
    with pytest.raises(ValueError, match="max_length"):
        BuildConfig.from_dict({"data": {"max_length": 4}})


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


@pytest.mark.slow
def test_an_installed_wheel_finds_its_recipes_targets_and_profiles(tmp_path):
    """A non-editable install (a user's ``pip install edgepack``) carries recipes, targets and profiles
    inside the package; ``edgepack build`` found none of them there ("unknown recipe 'default'; known
    recipes: "), as edgepack.resources read a namespace package's MultiplexedPath as a path."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src, site = tmp_path / "src", tmp_path / "site"
    # A copy: pip builds in the source tree, and the test writes nothing into the checkout.
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".venv*", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    probe = ("import edgepack, json; from edgepack.resources import data_files; "
             "print(json.dumps([edgepack.__file__] + [sorted(data_files(k, 'NONE')) for k in "
             "('recipes', 'targets', 'profiles')]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)}, check=True).stdout
    where, found_recipes, found_targets, found_profiles = json.loads(out)
    assert where.startswith(str(site))  # the installed copy, not this checkout
    assert found_recipes == sorted(p.stem for p in (root / "recipes").glob("*.toml"))
    assert found_targets == sorted(p.stem for p in (root / "targets").glob("*.toml"))
    assert found_profiles == sorted(p.stem for p in (root / "profiles").glob("*.toml"))


@pytest.mark.parametrize("name", sorted(recipes.available()))
def test_every_recipe_round_trips_through_recipe_toml(name, tmp_path):
    """What a build writes as BUILD/recipe.toml reads back to the same config (None fields included:
    a 'None' string once came back as student='None')."""
    from edgepack.config import BuildConfig

    cfg = recipes.load(name).replace(teacher="t", out=str(tmp_path / "b"), domains=None)
    path = tmp_path / "recipe.toml"
    path.write_text(cfg.to_toml())
    assert BuildConfig.from_toml(path) == cfg
    assert "None" not in path.read_text()
