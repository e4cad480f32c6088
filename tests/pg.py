"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a new cluster in a
temporary directory, listening on 127.0.0.1 only (a free port, its unix socket in the same directory),
password authentication, stopped and removed after the session whatever happens.

PostgreSQL refuses to run as root: under root the cluster belongs to the ``postgres`` system user
(the Debian package creates it) and its commands run through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

INSTALL = "apt-get install postgresql"


def server_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if (Path(p).parent / "pg_ctl").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def _reachable_tmp() -> str:
    """A temporary directory every user can pass through (the server runs as another user)."""
    for base in (tempfile.gettempdir(), "/tmp"):
        parts = Path(base).resolve()
        if all(os.stat(d).st_mode & 0o001 for d in (parts, *parts.parents)):
            return base
    return tempfile.gettempdir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bindir: Path, root: Path, owner: str | None):
        self.bindir, self.root, self.owner = bindir, root, owner
        self.data, self.log = root / "data", root / "server.log"
        self.user, self.password = "edgepack", secrets.token_hex(12)
        self.port = 0

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            tail = self.log.read_text()[-1500:] if self.log.is_file() else ""
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-1500:]}\n{tail}")
        return proc

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.owner:
            os.chown(pwfile, pwd.getpwnam(self.owner).pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()

    def start(self) -> None:
        # Durability off (a throwaway cluster); small buffers on a shared machine.
        opts = (f"-c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB -c max_connections=40")
        for attempt in range(3):  # a free port may be taken between the probe and the bind
            self.port = _free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", f"{opts} -p {self.port}", "start")
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def createdb(self, name: str) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
                       check=True, capture_output=True, text=True, timeout=60, env=env)

    def url(self, db: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="session")
def postgres():
    """A running server (``Server``: ``url(db)``, ``createdb(name)``), stopped after the session."""
    bindir = server_bin()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin): {INSTALL}")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    owner = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root and no 'postgres' user to own the cluster: {INSTALL}")
        owner = "postgres"
    # Not under pytest's temporary directory: its parent is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="edgepack-pg-", dir=_reachable_tmp() if owner else None))
    server = Server(bindir, root, owner)
    try:
        if owner:
            os.chown(root, pwd.getpwnam(owner).pw_uid, pwd.getpwnam(owner).pw_gid)
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
