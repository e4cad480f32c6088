"""The documentation holds: the site builds in strict mode (a broken link or reference fails), its pages
render in a real headless browser with every picture loaded, the runnable examples run, every command
shown parses with the real parsers, every module path named exists, and nothing points outside the
repository."""

from __future__ import annotations

import doctest
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
PAGES = sorted(DOCS.rglob("*.md"))
TEXTS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *PAGES]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the site -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_site_builds_in_strict_mode_with_the_generated_references(site):
    cli = (site / "reference" / "cli" / "index.html").read_text()
    # One section per command of each parser, written at build time: a new command shows up by itself.
    from edgepack.cli import COMMANDS

    for name in COMMANDS:
        assert f"edgepack {name}</code>" in cli, name
    assert "python -m runtime_shim predict</code>" in cli and "--max-drop" in cli
    runtime = (site / "reference" / "runtime" / "index.html").read_text()
    assert "OnnxPipeline" in runtime and "verify_bundle" in runtime
    assert (site / "results" / "index.html").is_file()


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The check that the site's links hold is real: a page linking to a missing file fails the build."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "how-to" / "your-data.md").write_text("# Data\n\nSee [the missing page](gone.md).\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "gone.md" in proc.stderr


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's console stays quiet
        pass


@pytest.fixture(scope="module")
def served(site):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe):
    file descriptors 3 (commands in) and 4 (answers out), messages separated by NUL bytes."""

    def __init__(self, profile: Path):
        import fcntl

        # Both child ends moved above 10 first, so placing them on 3 and 4 cannot overwrite one another;
        # they are close-on-exec, and the copies dup2 makes on 3 and 4 are the only ones chromium keeps.
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, out_w))
        os.close(cmd_r)
        os.close(out_w)

        def plumb():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1280,1600"],
            close_fds=False, preexec_fn=plumb, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._cmd_w)
        os.close(self._out_r)


IMAGES_JS = """JSON.stringify({
  title: document.title,
  text: document.body.innerText.length,
  images: Array.from(document.images).map(i => ({src: i.currentSrc, done: i.complete, w: i.naturalWidth}))
})"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("page, pictures", [("", 1), ("FLEET/", 1)], ids=["home", "how-to-fleet"])
def test_site_page_renders_in_chromium_with_its_pictures(served, tmp_path, page, pictures):
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": f"{served}/{page}"}, session=session)
        browser.wait_event("Page.loadEventFired")
        result = browser.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True}, session=session)
        seen = json.loads(result["result"]["value"])
    finally:
        browser.close()
    assert seen["title"].endswith("edgepack") and seen["text"] > 500, seen
    content = [i for i in seen["images"] if i["src"].endswith(".png")]
    assert len(content) >= pictures, seen["images"]
    broken = [i["src"] for i in seen["images"] if not (i["done"] and i["w"] > 0)]
    assert not broken, f"pictures that did not load: {broken}"


# --- runnable examples and commands ------------------------------------------------------------------

def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


PYCON = [(path, block) for path in TEXTS for block in _blocks(path.read_text(), "pycon")]


def test_the_docs_have_runnable_examples():
    assert PYCON, "no ```pycon block in the docs"


@pytest.mark.parametrize("path, block", PYCON, ids=[f"{_rel(p)}#{i}" for i, (p, _) in enumerate(PYCON)])
def test_docs_pycon_block_runs(path, block, tiny_bundle, tmp_path, monkeypatch):
    """Every ```pycon block runs as a doctest, in a directory where the demo's bundle is the tiny one."""
    (tmp_path / "edgepack-demo").mkdir()
    (tmp_path / "edgepack-demo" / "bundle").symlink_to(tiny_bundle, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest(block, {}, _rel(path), str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def _shell_lines(text: str) -> list[str]:
    lines = []
    for block in _blocks(text, "bash"):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _argv(line: str) -> list[str] | None:
    for part in line.split("&&"):
        words = shlex.split(part.strip())
        if words[:1] == ["edgepack"] or words[:3] == ["python", "-m", "runtime_shim"]:
            return words
    return None


DOC_COMMANDS = [(path, a) for path in [ROOT / "README.md", *PAGES] for a in (_argv(line) for line in _shell_lines(path.read_text())) if a]


@pytest.mark.parametrize("path, argv", DOC_COMMANDS, ids=[f"{_rel(p)}:{' '.join(a[:3])}" for p, a in DOC_COMMANDS])
def test_docs_command_parses(path, argv, tmp_path, monkeypatch):
    """Each command shown in the docs parses with the real parser (subcommands and flags exist); the
    paths it names exist as empty placeholders, since some arguments are checked while parsing."""
    for word in argv[1:]:
        if word.startswith(("-", "/", "..", "postgresql:", "sqlite:")) or not re.fullmatch(r"[\w./-]+", word):
            continue
        if "/" in word or word.isupper():
            p = tmp_path / word
            if p.suffix:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            else:
                p.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "edgepack":
        from edgepack.cli import make_parser

        assert make_parser().parse_args(argv[1:]).command == argv[1]
    else:
        from runtime_shim.__main__ import make_parser

        make_parser().parse_args(argv[3:])


# --- names and references ----------------------------------------------------------------------------

MODULE_PATH = re.compile(r"(?<![\w./-])((?:edgepack|runtime_shim)(?:\.[A-Za-z_]\w*)+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file under the tree
        return [p for pat in patterns for p in ROOT.glob(pat)]
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_every_module_path_named_in_the_docs_exists():
    """In the docs, the data files' comments and the code's comments and docstrings."""
    named = {}
    for path in TEXTS + _tracked("recipes/*.toml", "targets/*.toml", "profiles/*.toml", "*.py", "**/*.py"):
        if path == Path(__file__):  # its own examples of gone names
            continue
        text = path.read_text()
        if path.suffix == ".py":  # comments and docstrings; an import statement is code, not a doc
            text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("from ", "import ")))
        for dotted in MODULE_PATH.findall(text):
            dotted = dotted.rstrip(".")
            if dotted.endswith((".py", ".toml", ".json", ".log", ".md", ".build")):
                continue
            named.setdefault(dotted, _rel(path))
    assert len(named) > 10
    missing = {d: where for d, where in named.items() if not _resolves(d)}
    assert not missing, f"names the package does not have: {missing}"


def test_module_path_check_catches_a_gone_name():
    assert _resolves("runtime_shim.pipeline.OnnxPipeline")
    assert not _resolves("edgepack.bert_onnx") and not _resolves("edgepack.calibrate")


OUTSIDE = re.compile(r"FACTS\.md|DESIGN\.md|shared/docs|\bissues? #?\d+\b|\bissue \d+")


def test_nothing_points_outside_the_repository():
    """Docs, comments and docstrings name no file a user of the package does not have, and no issue
    number of the project's tracker."""
    hits = []
    for path in _tracked("*.md", "docs/**/*.md", "*.py", "**/*.py", "**/*.toml", "mkdocs.yml"):
        if path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{_rel(path)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
