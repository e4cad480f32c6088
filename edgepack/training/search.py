"""Hyperparameter search for distillation: an Optuna study over alpha, T, epochs and learning rate
(and the student's layer count when asked), maximising validation accuracy with the out-of-scope
threshold calibrated (plain accuracy when the labels have no out-of-scope class).

Each trial reports its validation score after every epoch; a median pruner stops trials that fall
behind the median of earlier trials at the same epoch. Storage is a SQLite file kept beside the output
while the search runs (``.OUT.search.db``) and moved into the output (``OUT/search.db``) when the
stage finishes; ``storage`` takes any database URL Optuna accepts (``postgresql://...``, through
psycopg 3), so workers on several machines run the same command and join one study by name.

Trials are counted over the whole study: N trials in all, however many workers share them. A worker
claims a trial slot under a lock (a PostgreSQL advisory lock, a file lock on a SQLite file's folder) so
two workers never take the last slot together, and waits while the remaining slots are held by
trials running elsewhere, so every worker returns the finished study. A trial whose worker died (no
heartbeat for two minutes: ``EDGEPACK_SEARCH_HEARTBEAT``/``EDGEPACK_SEARCH_GRACE`` seconds, 30/120 by
default) is marked failed and retried once with the same parameters, so an interrupted study resumes
where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgepack.config import DistillConfig
from edgepack.errors import EdgepackError

HEARTBEAT_S = 30
GRACE_S = 120
CONNECT_TIMEOUT_S = 10


@dataclasses.dataclass
class SearchResult:
    best_config: DistillConfig
    best_params: dict[str, Any]
    best_value: float
    trials: list[dict[str, Any]]
    study_name: str
    storage: str
    db_path: Path | None
    wall_time_s: float

    def record(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": redact(self.storage),
            "objective": "validation accuracy (out-of-scope threshold calibrated when the data has oos)",
            "best_params": self.best_params,
            "best_value": self.best_value,
            "trials": self.trials,
            "wall_time_s": self.wall_time_s,
        }


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: never write one into a record or a log."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user, has_password, _ = creds.partition(":")
        return f"{scheme}://{user}:***@{host}" if has_password else url
    return url


def driver_url(url: str) -> str:
    """A plain ``postgresql://`` (or ``postgres://``) URL names no driver; SQLAlchemy would take
    psycopg2. edgepack declares psycopg 3, so such a URL goes through it (``postgresql+psycopg://``)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise EdgepackError(f"--storage {redact(url)}: the PostgreSQL driver psycopg is not installed; "
                                "pip install 'edgepack[search]' (or psycopg[binary])") from None
        return f"postgresql+psycopg://{rest}"
    return url


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds, from ``EDGEPACK_SEARCH_HEARTBEAT`` and
    ``EDGEPACK_SEARCH_GRACE`` (defaults 30 and 120). A worker silent for the grace period is taken
    for dead: its trial is failed and retried."""
    values = []
    for name, default in (("EDGEPACK_SEARCH_HEARTBEAT", HEARTBEAT_S), ("EDGEPACK_SEARCH_GRACE", GRACE_S)):
        raw = os.environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = 0
        if value < 1:
            raise EdgepackError(f"{name}={raw}: give whole seconds, at least 1 (default {default})")
        values.append(value)
    heartbeat, grace = values
    if grace <= heartbeat:
        raise EdgepackError(f"EDGEPACK_SEARCH_GRACE={grace} must exceed EDGEPACK_SEARCH_HEARTBEAT={heartbeat} "
                            "(a live worker would be taken for dead); raise the grace period")
    return heartbeat, grace


def default_storage(out: Path) -> tuple[str, Path]:
    """``sqlite:///`` URL of the study file beside ``out``; seeded from ``out/search.db`` if a finished
    run left one, so rerunning with more trials continues the same study."""
    out = Path(out).resolve()
    db = out.parent / f".{out.name}.search.db"
    kept = out / "search.db"
    if not db.exists() and kept.is_file():
        shutil.copy2(kept, db)
    return f"sqlite:///{db}", db


def make_storage(url: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    shown = redact(url)
    url = driver_url(url)
    heartbeat, grace = heartbeat_settings()
    if url.startswith("sqlite"):
        # SQLite serialises writers: wait for the lock rather than fail when workers write at once.
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        # A study runs for hours: check pooled connections before use (a server restart or an idle
        # timeout drops them) and give up on an unreachable server after seconds, not minutes.
        engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    else:
        engine = {"pool_pre_ping": True}
    def open_storage():
        import sqlalchemy.exc

        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what resume needs
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=grace,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            except sqlalchemy.exc.IntegrityError:
                # Workers started together race to create Optuna's tables (PostgreSQL: a duplicate
                # pg_type row); the loser finds them made on the next try.
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)

    try:
        return open_storage()
    except (ImportError, ModuleNotFoundError) as e:
        raise EdgepackError(f"--storage {shown}: the database driver is missing ({e.name}); install it") from None
    except Exception as e:  # sqlalchemy raises many types for a bad URL or an unreachable server
        import sqlalchemy.exc

        first = _first_line(e)
        if isinstance(e, sqlalchemy.exc.OperationalError):
            raise EdgepackError(f"--storage {shown}: cannot connect ({first}); start the database server, "
                                "or fix the host, port, user, password or database in the URL") from None
        raise EdgepackError(f"--storage {shown}: cannot open ({type(e).__name__}: {first})") from None


def check_storage(url: str) -> None:
    """Open and close the storage: a bad URL or a server that is down fails before any training."""
    with _hushed_optuna():
        make_storage(url).engine.dispose()


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    if not text:
        return type(e).__name__
    # psycopg names the server as 'connection to server at "HOST" (ADDR), port P failed: REASON'.
    return text.splitlines()[0][:240]


@contextlib.contextmanager
def claim_lock(storage, url: str, study_name: str):
    """Held while a worker counts the study's trials and starts one, so two workers cannot both take
    the last slot: a PostgreSQL advisory lock (released by the server if the worker dies), a file
    lock on a SQLite file's directory; other databases go without (a race there costs one extra trial).
    Yields a function that releases the lock early (once the new trial is RUNNING)."""
    key = zlib.crc32(f"edgepack-search\0{study_name}".encode())
    released = False
    if url.startswith("postgresql"):
        import sqlalchemy

        conn = storage.engine.connect()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})

        def release():
            nonlocal released
            if not released:
                released = True
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.close()
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:" and hasattr(os, "O_DIRECTORY"):
        import fcntl

        # The lock is on the study file's directory: a lock file would be litter, and a second
        # descriptor on the database itself would drop SQLite's own POSIX locks when closed.
        folder = Path(url[len("sqlite:///"):].split("?", 1)[0]).resolve().parent
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)

        def release():
            nonlocal released
            if not released:
                released = True
                os.close(fd)  # closing drops the flock
    else:
        def release():
            pass
    try:
        yield release
    finally:
        release()


def suggest(trial, base: DistillConfig, *, max_layers: int | None) -> DistillConfig:
    """The search space. Low temperatures are favoured on purpose: students trained hot come out
    under-confident and gain less from the out-of-scope threshold."""
    changes: dict[str, Any] = {
        "alpha": trial.suggest_float("alpha", 0.0, 0.9),
        "temperature": trial.suggest_float("temperature", 1.0, 4.0, log=True),
        "epochs": trial.suggest_int("epochs", 3, max(3, base.epochs + 3)),
        "learning_rate": trial.suggest_float("learning_rate", 5e-5, 1e-3, log=True),
    }
    if max_layers:
        changes["num_layers"] = trial.suggest_int("num_layers", 1, max_layers)
        changes["layers"] = ()
    return base.replace(**changes)


def pruning_callback(trial, key: str):
    """A ``TrainerCallback`` reporting the validation score to ``trial`` after each epoch and stopping
    the run when the pruner says so."""
    import optuna
    from transformers import TrainerCallback

    class _Pruning(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(key)
            if value is None:
                return
            step = int(round(state.epoch or 0))
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {step}: {value:.4f} below the median")

    return _Pruning()


def run_search(prep, *, out: Path, progress: bool = True) -> SearchResult:
    """Run (or join, or resume) the study for ``prep.cfg``; returns the best config and the table."""
    with _hushed_optuna():
        return _run_search(prep, out=out, progress=progress)


@contextlib.contextmanager
def _hushed_optuna() -> Iterator[None]:
    """Optuna's INFO lines (a study made, a trial done) off for the block, then as the caller had them."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run_search(prep, *, out: Path, progress: bool) -> SearchResult:
    import optuna

    from edgepack.training import student as st
    from edgepack.training.distillation import run_once

    t0 = time.time()
    cfg: DistillConfig = prep.cfg
    n_total = cfg.search_trials
    db_path = None
    if cfg.storage:
        url = cfg.storage
    else:
        url, db_path = default_storage(out)
    storage = make_storage(url)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    # Workers joining later get other sampler seeds, so parallel workers do not repeat each other.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials), n_startup_trials=4)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    metric = "eval_cal_accuracy" if prep.data.oos_id is not None else "eval_accuracy"
    max_layers = None
    teacher = None
    if cfg.search_layers and not cfg.student:
        teacher = st.load_teacher(prep.teacher_dir)
        max_layers = st._depth(teacher.config)

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial) -> float:
        release()  # (the claim_lock below) the trial is RUNNING: the next worker's count includes it
        trial.set_user_attr("worker", worker)
        trial_cfg = suggest(trial, cfg.replace(search_trials=0, ablation=False), max_layers=max_layers)
        p = prep
        if max_layers:
            layers = st.pick_layers(trial_cfg.num_layers, max_layers)
            p = dataclasses.replace(prep, student_init=st.from_teacher(teacher, layers),
                                    hidden_map=[0] + [i + 1 for i in layers])
        _, m = run_once(p, trial_cfg, callbacks=[pruning_callback(trial, metric)], progress=progress)
        trial.set_user_attr("val_accuracy", m["val_accuracy"])
        trial.set_user_attr("best_epoch", m["best_epoch"])
        return float(m.get("val_accuracy_calibrated", m["val_accuracy"]))

    heartbeat, _ = heartbeat_settings()
    lock_url = driver_url(url)
    said = None
    while True:
        with claim_lock(storage, lock_url, cfg.study_name) as release:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed, queued again
            done, running, waiting = _counts(study)
            if said is None:
                print(f"search: study '{cfg.study_name}' at {redact(url)}: {done} of {n_total} trials done"
                      + (f", {running} running elsewhere" if running else ""))
                said = ()
            if done >= n_total:
                break
            if done + running < n_total or waiting:
                study.optimize(objective, n_trials=1, gc_after_trial=True)
                continue
        # Every remaining slot is held by a trial running elsewhere: wait for it to finish, or for its
        # worker to be found dead (its retry is then queued, and taken here).
        if said != (done, running):
            print(f"search: {done} of {n_total} trials done, waiting for {running} running elsewhere")
            said = (done, running)
        time.sleep(min(heartbeat, 5))
    try:
        best = study.best_trial
    except ValueError:
        raise EdgepackError(f"search: no trial of study '{cfg.study_name}' completed; see the trial table") from None
    trials = trial_table(study)
    print(format_table(trials))
    params = dict(best.params)
    changes = {k: v for k, v in params.items() if k != "num_layers"}
    if "num_layers" in params:
        changes.update(num_layers=params["num_layers"], layers=())
    return SearchResult(cfg.replace(**changes), params, float(best.value), trials, cfg.study_name, url, db_path,
                        round(time.time() - t0, 1))


def _counts(study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of ``study``; finished counts pruned ones too."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return done, states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def trial_table(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "value": None if t.value is None else round(float(t.value), 6),
            "params": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.params.items()},
            "epochs_run": max(t.intermediate_values) if t.intermediate_values else None,
            "duration_s": None if dur is None else round(dur, 1),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'#':>3} {'state':<8} {'val':>7} {'alpha':>6} {'T':>5} {'ep':>3} {'lr':>9} {'layers':>6} {'ran':>4} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["params"]

        def f(key, fmt, p=p):
            return format(p[key], fmt) if key in p else "-"
        lines.append(
            f"{r['number']:>3} {r['state']:<8} {'-' if r['value'] is None else format(r['value'], '.4f'):>7} "
            f"{f('alpha', '.2f'):>6} {f('temperature', '.2f'):>5} {f('epochs', 'd'):>3} {f('learning_rate', '.2e'):>9} "
            f"{f('num_layers', 'd'):>6} {r['epochs_run'] if r['epochs_run'] is not None else '-':>4} "
            f"{r['duration_s'] if r['duration_s'] is not None else '-':>6}"
        )
    return "\n".join(lines)
