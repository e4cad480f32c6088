"""Offline, tiny fixtures: a small intent corpus, a WordPiece tokenizer trained on it and a 2-layer,
32-wide BERT classifier trained for a few steps, all built into pytest's temporary directories."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The Ctrl-C tests need SIGINT to reach Python: a shell that starts the suite in the background (`cmd &`)
# ignores it, Python then installs no KeyboardInterrupt handler, and every child inherits the ignoring.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INTENTS = {
    "balance": ["what is my {acct} balance", "how much money is in my {acct}", "show the balance of my {acct}",
                "tell me my {acct} balance please", "check {acct} funds"],
    "transfer": ["move {amt} from my {acct} to savings", "send {amt} to my {acct}", "transfer {amt} into {acct}",
                 "wire {amt} from {acct}", "please transfer {amt} to my {acct}"],
    "weather": ["what is the weather in {city}", "will it rain in {city} tomorrow", "is it sunny in {city}",
                "forecast for {city} this week", "how cold is it in {city}"],
    "alarm": ["set an alarm for {time}", "wake me up at {time}", "alarm at {time} please",
              "cancel my {time} alarm", "change the alarm to {time}"],
    "oos": ["who won the {thing} game", "tell me a joke about {thing}", "what is the meaning of {thing}",
            "how do i bake {thing}", "recommend a movie about {thing}"],
}
FILL = {
    "acct": ["checking", "savings", "joint", "business"], "amt": ["ten dollars", "50 euros", "$200", "a hundred"],
    "city": ["paris", "boston", "tokyo", "lima"], "time": ["7 am", "noon", "6:30", "midnight"],
    "thing": ["football", "bread", "life", "cats"],
}


def _rows() -> list[tuple[str, str]]:
    rows = []
    for label, templates in INTENTS.items():
        for t in templates:
            for i in range(4):
                rows.append((t.format(**{k: vals[(i + j) % len(vals)] for j, (k, vals) in enumerate(FILL.items())}), label))
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[tuple[str, str]]]:
    rows = _rows()  # 100 rows: 20 per label
    by_label = {lab: [r for r in rows if r[1] == lab] for lab in INTENTS}
    split = {"train": [], "val": [], "test": []}
    for lab_rows in by_label.values():
        split["train"] += lab_rows[:12]
        split["val"] += lab_rows[12:16]
        split["test"] += lab_rows[16:]
    return split


@pytest.fixture(scope="session")
def clinc_json(tmp_path_factory, corpus) -> Path:
    """The corpus in the CLINC150 layout: in-scope and out-of-scope rows in separate keys."""
    data = {}
    for split, rows in corpus.items():
        data[split] = [list(r) for r in rows if r[1] != "oos"]
        data[f"oos_{split}"] = [list(r) for r in rows if r[1] == "oos"]
    path = tmp_path_factory.mktemp("data") / "tiny_clinc.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def label_names() -> list[str]:
    return sorted(INTENTS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus, label_names) -> Path:
    """A trained 2-layer, 32-wide BertForSequenceClassification with its WordPiece tokenizer."""
    from tiny import make_tiny_classifier

    texts = [t for t, _ in corpus["train"]]
    labels = [label_names.index(lab) for _, lab in corpus["train"]]
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny") / "model", texts, labels, label_names, steps=80)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models" / "clinc150-minilm-l6").is_dir():
        pytest.skip("../shared is absent (CLINC150 data and teachers)")
    return SHARED


def all_rows(corpus) -> list[tuple[str, str]]:
    return list(itertools.chain.from_iterable(corpus.values()))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, clinc_json) -> Path:
    """``edgepack pack`` of the tiny model on the tiny CLINC-style data (a real bundle)."""
    from edgepack.config import DataConfig, PackConfig
    from edgepack.runner.pack import pack

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    # The tiny model is trained for seconds: its int8 copy may wander; the gates are tested on their own.
    pack(PackConfig.of(target="auto", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20), tiny_model,
         DataConfig(source=str(clinc_json)), out, log=lambda *a: None)
    return out


# ------------------------------------------------------------------------------- a device's Python

DEVICE_PACKAGES = ("onnxruntime", "tokenizers", "numpy", "cryptography")  # the runtime, and signed bundles
NETWORK_ERRORS = ("Could not find a version", "NewConnectionError", "Failed to establish", "Network is unreachable",
                  "Temporary failure in name resolution", "No matching distribution")


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment without its Python paths (and with ``venv`` first on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def make_venv(path: Path, packages: list[str]) -> Path:
    """A fresh virtual environment at ``path`` with ``packages`` pip-installed; returns its python."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300, env=clean_env())
    python = path / "bin" / "python"
    if packages:
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], capture_output=True,
                              text=True, env=clean_env(path), timeout=900)
        if proc.returncode != 0:
            if any(m in proc.stderr for m in NETWORK_ERRORS):
                pytest.skip(f"cannot pip install {packages} into a fresh venv (no package index reachable)")
            raise AssertionError(f"pip install {packages} failed:\n{proc.stderr[-2000:]}")
    return python


VENV_CACHE = Path(os.environ.get("EDGEPACK_TEST_VENVS") or Path.home() / ".cache" / "edgepack" / "venvs")


def cached_venv(name: str, packages: list[str]) -> Path:
    """The python of ``VENV_CACHE/name`` holding ``packages``: made once per machine (a minute or more,
    from the package index) and reused by every later run; skips with the install line when it cannot be
    made."""
    import shutil
    import tempfile

    venv = VENV_CACHE / name
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file() and python.exists():
        return python
    line = (f"python3 -m venv {venv} && {python} -m pip install {' '.join(repr(p) for p in packages)} "
            f"&& touch {venv / '.complete'}")
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=VENV_CACHE))
    try:
        try:
            make_venv(tmp / "venv", packages)
        except BaseException as e:  # pytest.skip (no index) or a failed install: the line makes it by hand
            pytest.skip(f"no {venv} ({str(e).splitlines()[0][:200]}); make it with: {line}")
        shutil.rmtree(venv, ignore_errors=True)
        # Made beside the target under another name, then moved: a killed run leaves no half venv in place.
        # A venv's own files name its directory only in scripts this helper never runs (pip is run as -m).
        os.replace(tmp / "venv", venv)
        (venv / ".complete").write_text(" ".join(packages) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


@pytest.fixture(scope="session")
def device_python(tmp_path_factory) -> Path:
    """A device: a fresh venv holding only the runtime packages (and cryptography, for signed
    bundles) at the versions installed here. Built once per run; tests copy it when they need more."""
    from importlib import metadata

    pins = [f"{name}=={metadata.version(name)}" for name in DEVICE_PACKAGES]
    return make_venv(tmp_path_factory.mktemp("device") / "venv", pins)
