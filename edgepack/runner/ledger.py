"""The ledger of a build directory: which stages finished, with which config and input.

``BUILD/ledger/<stage>.json`` holds the config hash and the input hash a finished stage ran with; a
rerun skips a stage only when both match and its directory is there, so editing one stage's config
redoes that stage and those after it, and killing the build at any moment loses no finished stage.
It is the one way edgepack decides a stage is fresh (the build and the demo's teacher alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgepack.console import Log, Progress
from edgepack.records import hash_config, hash_tree, write_json_atomic


def output_hash(stage_dir: Path) -> str:
    """A stage's output identity: the hash of its record (``stage.json``, or a bundle's
    ``manifest.json``), which names its config, input and metrics; the whole tree if it has neither."""
    for name in ("stage.json", "manifest.json"):
        p = Path(stage_dir) / name
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
    return hash_tree(stage_dir)


class Ledger:
    """Runs stages into ``root/<name>`` unless the ledger vouches for them."""

    def __init__(self, root: Path, log: Log | None = None, *, total: int | None = None, prefix: str = "build",
                 share: tuple[Path, ...] = ()):
        self.root, self.log = Path(root), log or Progress()
        # Other build roots whose finished stages this one takes (hard-linked) when their ledger vouches
        # for the same config and input: the shape search's candidates share one student per depth.
        self.share = tuple(Path(p) for p in share if Path(p) != self.root)
        self.dir = self.root / "ledger"
        self.total, self.prefix, self.index = total, prefix, 0
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.why: dict[str, str] = {}  # stage -> why it ran or was skipped (``edgepack build --explain``)

    def fresh(self, name: str, config: Mapping[str, Any], input_hash: str) -> bool:
        entry = self.dir / f"{name}.json"
        if not ((self.root / name).is_dir() and entry.is_file()):
            return False
        key = _key(name, config, input_hash)
        recorded = json.loads(entry.read_text())
        return all(recorded.get(k) == v for k, v in key.items())

    def stage(self, name: str, config: Mapping[str, Any], input_hash: str, run: Callable[[Path], Any]) -> Path:
        """``root/<name>``: skipped when fresh, else ``run(out)`` and a new ledger entry."""
        self.index += 1
        out = self.root / name
        label = f"[{self.prefix} {self.index}/{self.total}] {name}" if self.total else f"[{self.prefix}] {name}"
        if self.fresh(name, config, input_hash) or self._adopt(name, config, input_hash):
            self.log(f"{label}: up to date (config and input unchanged), skipped")
            self.skipped.append(name)
            self.why[name] = "skipped: config and input unchanged"
            return out
        entry = self.dir / f"{name}.json"
        self.why[name] = why = reason(entry, (self.root / name).is_dir(), config, input_hash)
        entry.unlink(missing_ok=True)  # the ledger never vouches for a stage that is being redone
        self.log(f"{label}: running ({why})")
        t0 = time.time()
        run(out)
        write_json_atomic(entry, {**_key(name, config, input_hash), "config": dict(config),
                                  "seconds": round(time.time() - t0, 1),
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.log(f"{label}: done in {time.time() - t0:.0f} s")
        self.ran.append(name)
        return out


    def _adopt(self, name: str, config: Mapping[str, Any], input_hash: str) -> bool:
        """Take stage ``name`` from a shared root whose ledger vouches for it (hard links, renamed into
        place, then its ledger entry): True when taken."""
        for other in self.share:
            theirs = Ledger(other, self.log)
            if not theirs.fresh(name, config, input_hash):
                continue
            tmp = self.root / f".{name}.adopt"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self.root / name, ignore_errors=True)
            shutil.copytree(other / name, tmp, copy_function=os.link)
            os.replace(tmp, self.root / name)
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(theirs.dir / f"{name}.json", self.dir / f"{name}.json")
            self.log(f"[{self.prefix}] {name}: the same as {other.name}'s, taken from it")
            return True
        return False


def reason(entry: Path, present: bool, config: Mapping[str, Any], input_hash: str) -> str:
    """Why a stage runs, from its last ledger entry: never run, its output gone, which config fields
    changed (dotted paths, old -> new), or its input (the stage before it, or the teacher and data).

    >>> reason(Path("/nonexistent.json"), False, {}, "h")
    'no record of an earlier run'
    """
    if not entry.is_file():
        return "no record of an earlier run" if not present else "its ledger entry is gone (an interrupted run)"
    if not present:
        return "its output directory is gone"
    recorded = json.loads(entry.read_text())
    changed = _changed(recorded.get("config") or {}, json.loads(json.dumps(dict(config))))
    if changed:
        return "config changed: " + "; ".join(changed)
    if recorded.get("input_hash") != input_hash:
        return "its input changed (the stage before it reran, or the teacher or data changed)"
    return "config changed"  # a key written by an older edgepack, without its config


def _changed(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in _changed(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [f"{path} {json.dumps(old)} -> {json.dumps(new)}"]


def _key(name: str, config: Mapping[str, Any], input_hash: str) -> dict[str, str]:
    return {"stage": name, "config_hash": hash_config(config), "input_hash": input_hash}
