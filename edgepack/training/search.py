"""Hyperparameter search for distillation: an Optuna study over alpha, T, epochs and learning rate
(and the student's layer count when asked), maximising validation accuracy with the out-of-scope
threshold calibrated (plain accuracy when the labels have no out-of-scope class).

Each trial reports its validation score after every epoch; a median pruner stops trials that fall
behind the median of earlier trials at the same epoch. Storage is a SQLite file kept beside the output
while the search runs (``.OUT.search.db``) and moved into the output (``OUT/search.db``) when the
stage finishes; ``storage`` takes any database URL Optuna accepts (``postgresql://...``), so workers on
several machines run the same command and join one study by name. Trials are counted over the whole
study: N trials in all, however many workers share them. A trial whose worker died (no heartbeat for
two minutes) is marked failed and retried once, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from edgepack.config import DistillConfig
from edgepack.errors import EdgepackError

HEARTBEAT_S = 30
GRACE_S = 120


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
            "storage": _redact(self.storage),
            "objective": "validation accuracy (out-of-scope threshold calibrated when the data has oos)",
            "best_params": self.best_params,
            "best_value": self.best_value,
            "trials": self.trials,
            "wall_time_s": self.wall_time_s,
        }


def _redact(url: str) -> str:
    # Never write a database password into a record.
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


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
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    # SQLite serialises writers: wait for the lock rather than fail when workers write at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what resume needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    except (ImportError, ModuleNotFoundError) as e:
        raise EdgepackError(f"--storage {_redact(url)}: the database driver is missing ({e.name}); install it") from None
    except Exception as e:  # sqlalchemy raises many types for a bad URL or an unreachable server
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EdgepackError(f"--storage {_redact(url)}: cannot open ({type(e).__name__}: {first})") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def suggest(trial, base: DistillConfig, *, max_layers: int | None) -> DistillConfig:
    """The search space. Low temperatures are favoured on purpose: students trained hot come out
    under-confident and gain less from the out-of-scope threshold (FACTS.md)."""
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

    def objective(trial) -> float:
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

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < n_total:
        print(f"search: study '{cfg.study_name}' at {_redact(url)}: {done} of {n_total} trials done, running the rest")
        study.optimize(objective, n_trials=n_total - done, gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(n_total, states=finished)])
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
