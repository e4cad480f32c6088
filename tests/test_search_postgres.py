"""The distillation search over a real PostgreSQL server (tests/pg.py starts one on 127.0.0.1): worker
processes join one study by URL and share its N trials, a killed worker's trial is failed and retried
by the next worker, and the study resumes to N finished trials. Tiny models: a trial takes seconds.

The workers are real ``edgepack distill --search`` processes. Where a test needs a worker to be in the
middle of a trial at a known moment, the worker runs the same command line through ``WORKER`` below,
which only wraps the search's epoch callback: on its first report it either holds until every worker
of the test holds (so each has taken a trial) or stops for good (so the test can kill it there).
Nothing waits on a fixed sleep: each wait polls a state with a generous timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from pg import postgres  # noqa: F401  (the session fixture)

from edgepack.errors import EdgepackError

pytestmark = pytest.mark.slow

WORKER = r'''
import os, sys, time
from pathlib import Path
from edgepack.training import search

gate, mode, need = Path(os.environ["GATE"]), os.environ["MODE"], int(os.environ.get("NEED", "1"))
real, first = search.pruning_callback, []

def pruning_callback(trial, key):
    cb = real(trial, key)
    inner = cb.on_evaluate

    def on_evaluate(*args, **kwargs):
        inner(*args, **kwargs)  # the epoch's value is reported to the study first
        if not first:
            first.append(trial.number)
            (gate / f"{os.getpid()}.{trial.number}").write_text("")
            deadline = time.time() + 600
            while mode == "stop" or len(list(gate.iterdir())) < need:
                if time.time() > deadline:
                    sys.exit("worker: the other workers never took a trial")
                time.sleep(0.2)
    cb.on_evaluate = on_evaluate
    return cb

search.pruning_callback = pruning_callback
from edgepack.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _argv(tiny_model, clinc_json, tmp_path, out: str, url: str, study: str, n: int) -> list[str]:
    return ["distill", str(tiny_model), "--data", str(clinc_json), "--out", str(tmp_path / out), "--layers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-ablation", "--batch-size", "16", "--threads", "1",
            "--epochs", "1", "--search", str(n), "--storage", url, "--study-name", study]


def _spawn(argv: list[str], tmp_path: Path, name: str, env: dict[str, str], worker: bool = False) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, str(script), *argv] if worker else [sys.executable, "-m", "edgepack", *argv]
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process, in _finish)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    proc.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log_file.close()
    out = proc.log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def _wait_for(what: str, check, procs, timeout: float = 600):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                p.log_file.close()
                raise AssertionError(f"a worker exited ({p.returncode}) before {what}:\n{p.log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _study(url: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def _finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_two_workers_share_one_study(postgres, tiny_model, clinc_json, tmp_path):  # noqa: F811
    postgres.createdb("shared")
    url, n = postgres.url("shared"), 4
    gate = tmp_path / "gate"
    gate.mkdir()
    # A live worker is never taken for dead here: a minute of grace whatever the machine's load.
    env = _env(GATE=str(gate), MODE="hold", NEED="2", EDGEPACK_SEARCH_HEARTBEAT="2", EDGEPACK_SEARCH_GRACE="60")
    procs = [_spawn(_argv(tiny_model, clinc_json, tmp_path, name, url, "shared", n), tmp_path, name, env, worker=True)
             for name in ("a", "b")]
    logs = [_finish(p) for p in procs]

    study = _study(url, "shared")
    assert len(study.trials) == n and len(_finished(study)) == n  # N in all, not N per worker
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials}
    assert workers == {str(p.pid) for p in procs}  # both took trials
    for name, log in zip(("a", "b"), logs, strict=True):
        text = (tmp_path / name / "stage.json").read_text()
        assert postgres.password not in text and postgres.password not in log
        rec = json.loads(text)
        # Each worker returns the finished study, whichever of them ran the last trial.
        assert len(rec["search"]["trials"]) == n and all(t["state"] in ("COMPLETE", "PRUNED") for t in rec["search"]["trials"])
        assert rec["search"]["storage"] == postgres.url("shared").replace(postgres.password, "***")


def test_killed_worker_trial_is_retried_and_the_study_resumes(postgres, tiny_model, clinc_json, tmp_path):  # noqa: F811
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    from optuna.trial import TrialState

    postgres.createdb("resume")
    url, n = postgres.url("resume"), 3
    gate = tmp_path / "gate"
    gate.mkdir()
    env = _env(GATE=str(gate), MODE="stop", EDGEPACK_SEARCH_HEARTBEAT="1", EDGEPACK_SEARCH_GRACE="4")
    a = _spawn(_argv(tiny_model, clinc_json, tmp_path, "a", url, "resume", n), tmp_path, "a", env, worker=True)
    try:
        _wait_for("worker a's first epoch", lambda: list(gate.iterdir()), [a])
        running = _study(url, "resume").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        assert len(running) == 1 and running[0].intermediate_values  # in the middle of its trial
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        a.log_file.close()
    killed = running[0]
    assert _study(url, "resume").trials[killed.number].state == TrialState.RUNNING  # nobody told the study

    # The worker comes back (a plain postgresql:// URL this time: the same study through psycopg).
    b = _spawn(_argv(tiny_model, clinc_json, tmp_path, "b", url.replace("postgresql+psycopg://", "postgresql://"),
                     "resume", n), tmp_path, "b", _env(EDGEPACK_SEARCH_HEARTBEAT="1", EDGEPACK_SEARCH_GRACE="4"))
    _finish(b)

    study = _study(url, "resume")
    assert study.trials[killed.number].state == TrialState.FAIL
    assert len(_finished(study)) == n and len(study.trials) == n + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retries = [t for t in study.trials if Retry.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == killed.params
    assert retries[0].user_attrs["worker"].endswith(f":{b.pid}")
    rec = json.loads((tmp_path / "b" / "stage.json").read_text())
    assert [t["state"] for t in rec["search"]["trials"]].count("FAIL") == 1


# ------------------------------------------------------------------------------ URLs and bad input


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_server_down_is_one_line_with_the_url_redacted(tiny_model, clinc_json, tmp_path, capsys):
    pytest.importorskip("psycopg")
    from edgepack.cli import main

    url = f"postgresql://edgepack:s3cret@127.0.0.1:{_closed_port()}/study"
    rc = main(_argv(tiny_model, clinc_json, tmp_path, "out", url, "s", 2))
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "postgresql://edgepack:***@127.0.0.1" in err and "cannot connect" in err and "start the database server" in err
    assert "s3cret" not in err and not (tmp_path / "out").exists()


def test_plain_postgresql_url_goes_through_psycopg_and_settings_are_checked(monkeypatch):
    pytest.importorskip("psycopg")
    from edgepack.training.search import driver_url, heartbeat_settings, redact

    assert driver_url("postgresql://u:p@127.0.0.1:5/db") == "postgresql+psycopg://u:p@127.0.0.1:5/db"
    assert driver_url("postgresql+psycopg://u@127.0.0.1/db") == "postgresql+psycopg://u@127.0.0.1/db"
    assert driver_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db" and redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert heartbeat_settings() == (30, 120)
    monkeypatch.setenv("EDGEPACK_SEARCH_HEARTBEAT", "10")
    monkeypatch.setenv("EDGEPACK_SEARCH_GRACE", "5")
    with pytest.raises(EdgepackError, match="must exceed"):
        heartbeat_settings()
    monkeypatch.setenv("EDGEPACK_SEARCH_GRACE", "soon")
    with pytest.raises(EdgepackError, match="EDGEPACK_SEARCH_GRACE=soon"):
        heartbeat_settings()
