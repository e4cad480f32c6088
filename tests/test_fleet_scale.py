"""``benchmarks/fleet_scale.py``'s lab: two network namespaces, each with its own ``sshd`` behind a
shaped veth pair, reached by a real SSH login, and torn down (here on an exception inside the lab)
leaving no namespace, no process and no directory behind. Needs root, iproute2, nftables and sshd.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft") or not Path(SSHD).is_file(),
    reason="needs root, iproute2, nftables and OpenSSH's sshd",
)


@pytest.fixture
def fleet_scale(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fleet_scale

    return fleet_scale


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


async def _login(d, lab) -> str:
    import asyncssh

    async with asyncssh.connect(
        d.address,
        username="root",
        client_keys=[str(lab.key)],
        known_hosts=str(lab.known_hosts),
        connect_timeout=20,
    ) as conn:
        return (await conn.run("cat /proc/net/dev", check=True)).stdout


def test_two_namespaces_come_up_and_leave_nothing_behind(fleet_scale, tmp_path):
    before = _netns()
    link = fleet_scale.Link(delay_ms=30, loss_pct=0, rate_mbit=5)
    with pytest.raises(RuntimeError, match="the body failed"):
        with fleet_scale.Lab(2, tmp_path, link, net=214) as lab:
            names, base = [d.ns for d in lab.devices], lab.base
            assert set(names) <= _netns() and len(set(names)) == 2
            for d in lab.devices:
                started = time.monotonic()
                with socket.create_connection((d.address, 22), timeout=10) as s:
                    banner = s.recv(64)
                assert banner.startswith(b"SSH-2.0-OpenSSH")
                assert time.monotonic() - started >= 0.03  # the banner came through the delay line
                # A real login, with the device's own host key: the shell runs inside its namespace.
                interfaces = asyncio.run(_login(d, lab))
                assert d.veth_there in interfaces and d.veth_here not in interfaces
                qdisc = subprocess.run(
                    ["tc", "qdisc", "show", "dev", d.veth_here], capture_output=True, text=True
                ).stdout
                assert "tbf" in qdisc and "5Mbit" in qdisc
            assert _processes_mentioning(str(base))  # the sshds and the delay lines
            raise RuntimeError("the body failed")
    assert not set(names) & _netns()
    assert _netns() <= before
    assert not _processes_mentioning(str(base))
    assert not base.exists()
    assert not (tmp_path / f"known_hosts-{lab.tag}").exists()
    assert sys.modules["fleet_scale"].ours() == [
        n for n in sorted(before) if n.startswith(fleet_scale.PREFIX)
    ]
