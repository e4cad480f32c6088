"""The fleet at scale over a real, slow network: N devices, each a network namespace of its own with
its own ``sshd``, reached over a veth pair from this machine, timed through ``edgepack devices
--check``, ``devices --setup``, ``deploy`` and ``fleet bench`` at N = 10, 50, 100, with the peak memory
of the edgepack process; then a ~20 MB upload whose link is cut, to decide whether resumable uploads
are worth building. Needs root and iproute2 (and nftables for loss).

    sudo nice -n 10 python benchmarks/fleet_scale.py --work /tmp/fleet-scale --sizes 10,50,100
    python benchmarks/fleet_scale.py --cleanup          # remove what a killed run left (namespaces, dirs)

Each device: namespace ``epscale-<tag>-<i>``, veth ``es<tag><i>h`` (here, 10.<net>.<i>.1/24) to
``es<tag><i>d`` (there, 10.<net>.<i>.2/24), no route anywhere else, so every byte stays on the veth
pairs this script made. Its files: ``/var/lib/edgepack-fleet-scale/<tag>/dev<i>/`` holding its
``remote_dir`` and ``runtime_dir`` (the namespaces share this machine's file system, so each device
gets its own directories through the inventory's ``remote_dir`` and ``runtime_dir``; deploy logs in
as root). The runtime venv of each device is a hard-linked copy of one venv holding onnxruntime,
tokenizers and numpy (the device image), so ``--setup`` installs this machine's runtime wheel into it
without downloading a package per device.

The link (each direction): ``--rate-mbit`` through the kernel's ``tbf``, ``--loss`` through an
nftables rule inside the namespace (``numgen random``), ``--delay-ms`` through a delay line in the
namespace (every byte forwarded to the device's ``sshd`` that many ms after it arrived): this kernel
has no ``netem`` (``CONFIG_NET_SCH_NETEM`` is not set), the usual way to add delay.

Everything is torn down at the end, on Ctrl-C and on an exception: the processes in each namespace
(``ip netns pids``), the namespaces (their veths go with them) and the device directories.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from _shared import DATA, ROOT, TEACHER  # offline settings, this checkout on sys.path, ../shared

PREFIX = "epscale-"  # every namespace this script makes starts so
DEVICE_BASE = Path("/var/lib/edgepack-fleet-scale")  # root's, 0755: the runtime dirs under it are protected
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# ----------------------------------------------------------------------------------- the delay line


async def _delay_line(listen: str, target: str, delay_s: float) -> None:
    """Forward every connection to ``listen`` to ``target``, each chunk ``delay_s`` after it arrived, in
    both directions (a propagation delay: throughput is the link's, not one chunk per delay)."""
    loop = asyncio.get_running_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=512)

        async def feed() -> None:
            try:
                while data := await reader.read(65536):
                    await queue.put((loop.time() + delay_s, data))
            except OSError:
                pass
            await queue.put((loop.time() + delay_s, b""))

        feeder = asyncio.create_task(feed())
        try:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            feeder.cancel()
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = target.rsplit(":", 1)
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        # Whichever side closes (or is reset) ends both: a cut connection is cut through to sshd.
        done, pending = await asyncio.wait(
            [asyncio.create_task(pump(client_r, server_w)), asyncio.create_task(pump(server_r, client_w))],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for t in pending:
            t.cancel()
        server_w.close()
        client_w.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), backlog=256)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------------------ the lab


@dataclass(frozen=True)
class Link:
    delay_ms: float = 100.0  # each direction
    loss_pct: float = 1.0  # each direction
    rate_mbit: float = 5.0  # each direction

    def __str__(self) -> str:
        return (
            f"{self.delay_ms:g} ms delay, {self.loss_pct:g}% loss, {self.rate_mbit:g} Mbit/s, each direction"
        )


@dataclass
class Device:
    index: int
    ns: str
    veth_here: str
    veth_there: str
    address: str
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"dev{self.index:03d}"


class Lab:
    """N namespaces with an sshd each, set up by ``__enter__`` and torn down by ``__exit__`` (also on
    Ctrl-C and exceptions), leaving no namespace, process or directory behind."""

    def __init__(
        self,
        n: int,
        work: Path,
        link: Link,
        *,
        net: int = 213,
        template_venv: Path | None = None,
        tag: str | None = None,
    ):
        self.n, self.work, self.link, self.net, self.template = n, work, link, net, template_venv
        self.tag = tag or uuid.uuid4().hex[:4]
        self.base = DEVICE_BASE / self.tag
        self.devices: list[Device] = []
        self.key = work / "id_ed25519"
        self.known_hosts = work / f"known_hosts-{self.tag}"

    # ---------------------------------------------------------------------------------- set up

    def __enter__(self) -> Lab:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _check_free(self) -> None:
        subnet = f"10.{self.net}."
        used = sh("ip", "-o", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
        if subnet in used:
            raise RuntimeError(
                f"10.{self.net}.0.0/16 is already in use on this machine (another run?): pass "
                "--net N to use 10.N.0.0/16, or --cleanup to remove a killed run's namespaces"
            )

    def _up(self) -> None:
        import asyncssh

        if os.geteuid() != 0:
            raise SystemExit("fleet_scale: needs root (ip netns, veth pairs, tc)")
        self._check_free()
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(self.key))
            self.key.chmod(0o600)
        authorized = self.work / "authorized_keys"
        authorized.write_bytes(asyncssh.read_private_key(str(self.key)).export_public_key("openssh"))
        DEVICE_BASE.mkdir(mode=0o755, exist_ok=True)
        self.base.mkdir(mode=0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        hosts = []
        for i in range(1, self.n + 1):
            d = Device(
                i,
                f"{PREFIX}{self.tag}-{i}",
                f"es{self.tag}{i}h",
                f"es{self.tag}{i}d",
                f"10.{self.net}.{i}.2",
                self.base / f"dev{i:03d}",
            )
            self.devices.append(d)
            self._device_up(d, authorized)
            host_key = d.home / "ssh" / "host_key"
            pub = asyncssh.read_private_key(str(host_key)).export_public_key("openssh").decode().split()
            hosts.append(f"{d.address} {pub[0]} {pub[1]}\n")
        self.known_hosts.write_text("".join(hosts))
        for d in self.devices:
            self._wait_listening(d)

    def _device_up(self, d: Device, authorized: Path) -> None:
        import asyncssh

        here = f"10.{self.net}.{d.index}.1"
        sh("ip", "netns", "add", d.ns)
        sh("ip", "link", "add", d.veth_here, "type", "veth", "peer", "name", d.veth_there, "netns", d.ns)
        sh("ip", "addr", "add", f"{here}/24", "dev", d.veth_here)
        sh("ip", "link", "set", d.veth_here, "up")
        sh("ip", "-n", d.ns, "addr", "add", f"{d.address}/24", "dev", d.veth_there)
        sh("ip", "-n", d.ns, "link", "set", d.veth_there, "up")
        sh("ip", "-n", d.ns, "link", "set", "lo", "up")
        for dev, ns in ((d.veth_here, None), (d.veth_there, d.ns)):
            if self.link.rate_mbit > 0:
                # burst: ~10 ms at the rate (at least 4 packets); latency: how long a packet may queue.
                burst = max(6000, int(self.link.rate_mbit * 1e6 / 8 / 100))
                sh(
                    "tc",
                    *(["-n", ns] if ns else []),
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{self.link.rate_mbit}mbit",
                    "burst",
                    str(burst),
                    "latency",
                    "500ms",
                )
        set_loss(d, self.link.loss_pct, create=True)
        (d.home / "ssh").mkdir(parents=True)
        (d.home / "edgepack").mkdir()
        (d.home / "home").mkdir()  # the device's own home: not this machine's ~/.bashrc on every command
        host_key = d.home / "ssh" / "host_key"
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(host_key))
        host_key.chmod(0o600)
        config = d.home / "ssh" / "sshd_config"
        config.write_text(f"""Port 22
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d.home / "ssh" / "sshd.pid"}
AuthorizedKeysFile {authorized}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 100:30:200
Subsystem sftp internal-sftp
SetEnv PIP_NO_INDEX=1 HOME={d.home / "home"}
LogLevel ERROR
""")
        if self.template is not None:
            (d.home / "runtime").mkdir(mode=0o755)
            sh("cp", "-al", str(self.template), str(d.home / "runtime" / "venv"))
        log = open(d.home / "ssh" / "log", "w")  # noqa: SIM115 (closed with the process)
        d.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", d.ns, SSHD, "-D", "-e", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        d.procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    d.ns,
                    sys.executable,
                    __file__,
                    "_delayline",
                    f"{d.address}:22",
                    "127.0.0.1:22",
                    str(self.link.delay_ms),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _wait_listening(self, d: Device) -> None:
        for _ in range(200):
            out = sh("ip", "netns", "exec", d.ns, "ss", "-Htln", check=False).stdout
            if f"{d.address}:22" in out and "127.0.0.1:22" in out:
                return
            if any(p.poll() is not None for p in d.procs):
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"{d.name}: sshd or the delay line did not start: {(d.home / 'ssh' / 'log').read_text()[-500:]}"
        )

    # ------------------------------------------------------------------------------- tear down

    def down(self) -> None:
        for d in self.devices:
            for p in d.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for d in self.devices:
            for p in d.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        remove_namespaces([d.ns for d in self.devices])
        shutil.rmtree(self.base, ignore_errors=True)
        with contextlib.suppress(OSError):
            DEVICE_BASE.rmdir()  # only when no other run's directory is there
        self.known_hosts.unlink(missing_ok=True)
        self.devices = []

    # ----------------------------------------------------------------------------- inventory

    def inventory(self, profile: str) -> Path:
        lines = []
        for d in self.devices:
            lines += [
                f"[devices.{d.name}]",
                f'host = "{d.address}"',
                'user = "root"',
                f'key_file = "{self.key}"',
                f'known_hosts = "{self.known_hosts}"',
                'python = "/usr/bin/python3"',
                f'remote_dir = "{d.home / "edgepack"}"',
                f'runtime_dir = "{d.home / "runtime"}"',
                f'profile = "{profile}"',
                "connect_timeout = 60",
                "",
            ]
        path = self.work / f"devices-{self.tag}.toml"
        path.write_text("\n".join(lines))
        return path


def set_loss(d: Device, loss_pct: float, *, create: bool = False) -> None:
    """Drop ``loss_pct`` percent of the packets on the device's end of the link, each direction (100: cut)."""
    per_mille = int(round(loss_pct * 10))
    chains = ""
    for hook, way in (("input", "iifname"), ("output", "oifname")):
        chance = f"numgen random mod 1000 < {per_mille} " if per_mille < 1000 else ""
        rule = f'        {way} "{d.veth_there}" {chance}drop\n' if per_mille else ""
        chains += (
            f"    chain {hook} {{\n        type filter hook {hook} priority 0; policy accept;\n{rule}    }}\n"
        )
    text = ("" if create else "flush table inet linkloss\n") + f"table inet linkloss {{\n{chains}}}\n"
    sh("ip", "netns", "exec", d.ns, "nft", "-f", "-", input=text)


def remove_namespaces(names: list[str]) -> None:
    """Kill every process in each namespace (sshd's sessions, the device's runtime), then delete it."""
    for ns in names:
        for _ in range(20):
            pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        sh("ip", "netns", "del", ns, check=False)


def ours() -> list[str]:
    return [
        line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.startswith(PREFIX)
    ]


def cleanup() -> None:
    names = ours()
    remove_namespaces(names)
    shutil.rmtree(DEVICE_BASE, ignore_errors=True)
    say(f"removed {len(names)} namespace(s) and {DEVICE_BASE}")


# ----------------------------------------------------------------------------------- measuring


@dataclass
class Timed:
    command: str
    seconds: float
    exit: int
    peak_rss_mb: float
    last_line: str
    timed_out: bool = False


def timed(argv: list[str], log: Path, env: dict[str, str], timeout: float) -> Timed:
    """Run one edgepack command; its wall time and its peak resident memory (GNU time's %M: measured in
    a small parent, as a process forked from this one would inherit this one's high-water mark)."""
    started = time.monotonic()
    rss = log.with_suffix(".rss")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M", "-o", str(rss), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        timed_out = False
        deadline = started + timeout
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True  # Ctrl-C first, as a person would; then the kill
                os.killpg(proc.pid, signal.SIGINT)
                deadline = time.monotonic() + 30
            elif timed_out and time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = round(time.monotonic() - started, 2)
    lines = [
        ln
        for ln in log.read_text(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("Command exited with non-zero status")
    ]
    try:
        peak = round(int(rss.read_text().split()[-1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        peak = float("nan")
    return Timed(
        " ".join(argv[2:4]), seconds, proc.returncode, peak, lines[-1][:200] if lines else "", timed_out
    )


def edgepack_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["EDGEPACK_PROFILES_PATH"] = str(work / "profiles")
    env["COLUMNS"] = "200"
    return env


def write_profile(work: Path) -> str:
    from edgepack import targets

    (work / "profiles").mkdir(parents=True, exist_ok=True)
    # Budgets wide open: the devices share two cores, so their latencies measure contention, not a CPU.
    (work / "profiles" / "scale-device.toml").write_text(
        f'target = "{targets.detect().name}"\nphysical_cores = 1\nmemory_mb = 1024\n\n[budgets]\n'
        "p95_latency_ms = 100000.0\npeak_memory_mb = 100000.0\nbundle_size_mb = 1000.0\nmax_accuracy_drop = 100.0\n"
    )
    return "scale-device"


def template_venv(work: Path) -> Path:
    """The device image's Python environment: a venv of the device's Python (/usr/bin/python3) with the
    runtime's packages at this machine's versions; each device gets a hard-linked copy."""
    from importlib import metadata

    venv = work / "device-image-venv"
    if (venv / "complete").exists():
        return venv
    say("building the device image's venv (onnxruntime, tokenizers, numpy; once)")
    shutil.rmtree(venv, ignore_errors=True)
    sh("/usr/bin/python3", "-m", "venv", str(venv))  # a venv's paths are absolute: built under its final name
    sh(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        *(f"{n}=={metadata.version(n)}" for n in RUNTIME_PACKAGES),
        timeout=1800,
    )
    (venv / "complete").touch()
    return venv


def small_bundle(work: Path) -> Path:
    """A tiny real bundle (the test suite's 2-layer, 32-wide BERT trained on a CLINC150 slice, packed):
    the fleet machinery's cost, not the model's, is what the scale runs time."""
    out = work / "small-bundle"
    if (out / "manifest.json").exists():
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_classifier

    from edgepack.config import DataConfig, PackConfig
    from edgepack.runner.pack import pack

    raw = json.loads(DATA.read_text())
    keep = sorted({label for _, label in raw["train"]})[:10]  # ten intents plus out-of-scope
    data = {}
    for split in ("train", "val", "test"):
        per = 40 if split == "train" else 10
        data[split] = [r for label in keep for r in [r for r in raw[split] if r[1] == label][:per]]
        data[f"oos_{split}"] = raw[f"oos_{split}"][:40]
    src = work / "small-data.json"
    src.write_text(json.dumps(data))
    rows = data["train"] + [[t, "oos"] for t, _ in data["oos_train"]]
    names = sorted({label for _, label in rows})
    model = make_tiny_classifier(
        work / "small-model", [t for t, _ in rows], [names.index(lab) for _, lab in rows], names, steps=60
    )
    pack(
        PackConfig.of(target="auto", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=100),
        model,
        DataConfig(source=str(src)),
        out,
        log=lambda *a: None,
    )
    return out


def big_bundle(work: Path) -> Path:
    """The shared teacher packed (~23 MB): the upload whose link is cut."""
    out = work / "teacher-bundle"
    if not (out / "manifest.json").exists():
        say("packing the shared teacher (~23 MB bundle; once)")
        sh(
            sys.executable,
            "-m",
            "edgepack",
            "pack",
            str(TEACHER),
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--max-accuracy-drop",
            "2",
            timeout=3600,
        )
    return out


def bundle_mb(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) / 1e6
    )


# ------------------------------------------------------------------------------------ the scale runs


def run_size(n: int, args, work: Path, bundle: Path, template: Path, profile: str) -> dict:
    link = Link(args.delay_ms, args.loss, args.rate_mbit)
    env = edgepack_env(work)
    ep = [sys.executable, "-m", "edgepack"]
    out_dir = work / f"n{n}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    rows: list[Timed] = []
    started = time.monotonic()
    with Lab(n, work, link, net=args.net, template_venv=template) as lab:
        up = time.monotonic() - started
        say(f"N={n}: {n} namespaces with sshd up in {up:.1f} s ({link})")
        inv = str(lab.inventory(profile))
        jobs = ["--jobs", str(args.jobs)]
        steps = [
            ("devices --check", [*ep, "devices", "--check", "--inventory", inv, *jobs]),
            ("devices --setup", [*ep, "devices", "--setup", "--inventory", inv, *jobs]),
            ("deploy", [*ep, "deploy", str(bundle), "--to", "all", "--inventory", inv, *jobs]),
        ]
        if rollout_available(env):
            steps.append(("rollout", [*ep, "rollout", str(bundle), "--to", "all", "--inventory", inv, *jobs]))
        steps.append(
            (
                "fleet bench",
                [
                    *ep,
                    "fleet",
                    "bench",
                    str(bundle),
                    "--to",
                    "all",
                    "--inventory",
                    inv,
                    *jobs,
                    "--runs",
                    str(args.runs),
                    "--warmup",
                    str(args.warmup),
                    "--out",
                    str(out_dir / "bench"),
                ],
            )
        )
        budget_end = started + args.size_budget
        for label, argv in steps:
            left = budget_end - time.monotonic()
            if left < 10:
                say(f"N={n}: {label}: skipped (the size's time budget of {args.size_budget:g} s is spent)")
                rows.append(Timed(label, float("nan"), -1, float("nan"), "skipped: time budget spent", True))
                continue
            say(f"N={n}: {label} ...")
            t = timed(
                argv,
                out_dir / f"{label.replace(' ', '_').replace('-', '')}.log",
                env,
                min(args.timeout, left),
            )
            t.command = label
            rows.append(t)
            say(
                f"N={n}: {label}: {t.seconds:.1f} s, exit {t.exit}, peak {t.peak_rss_mb:.0f} MB"
                + (" (TIMED OUT)" if t.timed_out else "")
                + f"  | {t.last_line[:120]}"
            )
    return {
        "n": n,
        "lab_up_s": round(up, 1),
        "steps": [t.__dict__ for t in rows],
        "bench": bench_summary(out_dir / "bench"),
    }


def rollout_available(env: dict[str, str]) -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "edgepack", "rollout", "--help"], capture_output=True, env=env
    )
    return proc.returncode == 0


def bench_summary(out: Path) -> dict:
    """How many devices fleet bench measured, and their p50 latencies' spread (contention on 2 cores)."""
    try:
        data = json.loads((out / "fleet.json").read_text())
    except (OSError, ValueError):
        return {}
    devices = data.get("devices") or data.get("results") or []
    p50s = []
    for d in devices:
        lat = (d.get("latency_ms") or d.get("latency") or {}) if isinstance(d, dict) else {}
        if isinstance(lat, dict) and lat.get("p50") is not None:
            p50s.append(float(lat["p50"]))
    p50s.sort()
    out_ = {"devices": len(devices), "measured": len(p50s)}
    if p50s:
        out_.update(p50_median_ms=round(p50s[len(p50s) // 2], 2), p50_max_ms=round(p50s[-1], 2))
    return out_


# ------------------------------------------------------------------------------- the cut upload


def incoming_bytes(home: Path, skip: frozenset[Path] = frozenset()) -> int:
    """Bytes in the device's ``.incoming-*`` upload directories (those not in ``skip``)."""
    total = 0
    for inc in home.glob("edgepack/*/releases/.incoming-*"):
        if inc not in skip:
            total += sum(p.stat().st_size for p in inc.rglob("*") if p.is_file())
    return total


def link_baseline(lab: Lab, size_bytes: int) -> float:
    """Seconds to send ``size_bytes`` over the device's link with one SFTP put (asyncssh, as deploy uses)."""
    import asyncssh

    d = lab.devices[0]
    src = lab.work / "link-baseline.bin"
    src.write_bytes(os.urandom(size_bytes))

    async def put() -> float:
        async with (
            asyncssh.connect(
                d.address, username="root", client_keys=[str(lab.key)], known_hosts=str(lab.known_hosts)
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            started = time.monotonic()
            await sftp.put(str(src), str(d.home / "link-baseline.bin"))
            return time.monotonic() - started

    try:
        return asyncio.run(put())
    finally:
        src.unlink(missing_ok=True)
        (d.home / "link-baseline.bin").unlink(missing_ok=True)


def upload_test(args, work: Path, bundle: Path, template: Path, profile: str) -> dict:
    """One device, the big bundle: a clean upload, one cut for a few seconds (100% loss: the TCP
    connection survives), and one dropped connection (the socket killed on the device's side, as a
    reboot or a NAT reset does), after which deploy is run again."""
    link = Link(args.delay_ms, args.upload_loss, args.rate_mbit)
    env = edgepack_env(work)
    out_dir = work / "upload"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    size = bundle_mb(bundle)
    results: dict = {"bundle_mb": round(size, 2), "link": str(link), "runs": []}
    with Lab(1, work, link, net=args.net, template_venv=template) as lab:
        d = lab.devices[0]
        inv = str(lab.inventory(profile))
        ep = [sys.executable, "-m", "edgepack"]
        deploy = [*ep, "deploy", str(bundle), "--to", "all", "--inventory", inv]
        t = timed([*ep, "devices", "--setup", "--inventory", inv], out_dir / "setup.log", env, args.timeout)
        if t.exit != 0:
            raise RuntimeError(f"setup of the upload device failed: {t.last_line}")

        def fresh() -> None:  # forget the bundle on the device, so the next deploy sends it whole
            shutil.rmtree(d.home / "edgepack", ignore_errors=True)
            (d.home / "edgepack").mkdir()

        def run(label: str, fault=None, at: float = 0.5) -> dict:
            log = out_dir / f"{label}.log"
            before = frozenset(
                d.home.glob("edgepack/*/releases/.incoming-*")
            )  # a killed run's, not this one's
            started = time.monotonic()
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    deploy, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            seen, fault_at, fault_done, sent_at = 0, None, fault is None, None
            while proc.poll() is None:
                seen = max(seen, incoming_bytes(d.home, before))
                if sent_at is None and seen >= 0.999 * size * 1e6:
                    sent_at = round(time.monotonic() - started, 2)
                if not fault_done and seen >= at * size * 1e6:
                    fault_at = round(time.monotonic() - started, 2)
                    fault(d)
                    fault_done = True
                if time.monotonic() - started > args.timeout:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait()
                time.sleep(0.05)
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            row = {
                "run": label,
                "seconds": round(time.monotonic() - started, 2),
                "exit": proc.returncode,
                "fault_at_s": fault_at,
                "all_bytes_there_at_s": sent_at,
                "mb_on_device_at_most": round(seen / 1e6, 2),
                "last_line": lines[-1][:200] if lines else "",
            }
            say(
                f"upload: {label}: {row['seconds']} s, exit {row['exit']}, fault at {fault_at} s  | {row['last_line'][:110]}"
            )
            results["runs"].append(row)
            return row

        def cut(seconds: float):
            def apply(dev: Device) -> None:
                set_loss(dev, 100)
                time.sleep(seconds)
                set_loss(dev, link.loss_pct)

            return apply

        def drop(dev: Device) -> None:
            # Kill the TCP connection on the device's side (a reset reaches this machine's end).
            sh(
                "ip",
                "netns",
                "exec",
                dev.ns,
                "ss",
                "-K",
                "state",
                "established",
                "src",
                f"{dev.address}",
                check=False,
            )

        base = link_baseline(lab, int(size * 1e6))
        results["link_baseline_s"] = round(base, 2)
        say(
            f"upload: the link alone: {size:.1f} MB by one SFTP put in {base:.1f} s ({size * 8 / base:.2f} Mbit/s)"
        )
        for i in range(args.upload_repeats):
            fresh()
            run(f"clean-{i + 1}")
        for seconds in args.cuts:
            fresh()
            run(f"cut-{seconds:g}s", cut(seconds))
        fresh()
        run("dropped", drop)
        left_behind = incoming_bytes(d.home)
        results["left_behind_mb"] = round(left_behind / 1e6, 2)
        run("rerun-after-drop")
        results["left_after_rerun_mb"] = round(incoming_bytes(d.home) / 1e6, 2)
    return results


# ---------------------------------------------------------------------------------- the report


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def per_device(work: Path, n: int, command: str) -> list[float]:
    """Each device's own seconds where the command reports them: deploy's line per device (upload, check
    on the device and switch, after connecting; fleet.json's per-device seconds include the queue)."""
    if command == "deploy":
        text = (
            (work / f"n{n}" / "deploy.log").read_text(errors="replace")
            if (work / f"n{n}" / "deploy.log").exists()
            else ""
        )
        return [float(x) for x in re.findall(r": deployed .*?, ([0-9.]+) s\)", text)]
    return []


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    pct = lambda q: v[min(len(v) - 1, round(q * (len(v) - 1)))]  # noqa: E731 (nearest rank)
    return f"{pct(0.5):.1f} / {sum(v) / len(v):.1f} / {pct(0.95):.1f}"


def write_report(work: Path, meta: dict, sizes: list[dict], upload: dict | None) -> None:
    md = [
        f"CPU: {meta['cpu']} ({meta['cores']} cores), {meta['date']}; link: {meta['link']}; "
        f"--jobs {meta['jobs']}; bundle {meta['bundle_mb']:.2f} MB; fleet bench --runs {meta['runs']} "
        f"--warmup {meta['warmup']}",
        "",
        "| N | command | wall time (s) | wall time / N (s) | one device's own time, p50 / mean / p95 (s) | exit "
        "| peak memory of edgepack (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        for t in s["steps"]:
            per = t["seconds"] / s["n"] if t["seconds"] == t["seconds"] else float("nan")
            md.append(
                f"| {s['n']} | {t['command']} | {t['seconds']:.1f}{' (timed out)' if t['timed_out'] else ''} "
                f"| {per:.2f} | {spread(per_device(work, s['n'], t['command']))} | {t['exit']} "
                f"| {t['peak_rss_mb']:.0f} |"
            )
    for s in sizes:
        b = s.get("bench") or {}
        if b.get("measured"):
            md.append(
                f"\nN={s['n']}: fleet bench measured {b['measured']}/{s['n']} devices; their p50 latencies: "
                f"median {b['p50_median_ms']} ms, slowest {b['p50_max_ms']} ms (devices sharing the cores)."
            )
    if upload:
        md += [
            "",
            f"Upload of {upload['bundle_mb']} MB to one device ({upload['link']}):",
            "",
            "| run | wall time (s) | every byte there at (s) | exit | fault at (s) | MB on the device at most |",
            "|---|---|---|---|---|---|",
        ]
        for r in upload["runs"]:
            md.append(
                f"| {r['run']} | {r['seconds']:.1f} | {r.get('all_bytes_there_at_s') or '-'} | {r['exit']} "
                f"| {r['fault_at_s'] or '-'} | {r['mb_on_device_at_most']} |"
            )
        md.append(
            f"\nThe link alone (one SFTP put of as many bytes): {upload.get('link_baseline_s')} s. Left on the "
            f"device in .incoming-*: {upload.get('left_behind_mb')} MB after the drop, "
            f"{upload.get('left_after_rerun_mb')} MB after the rerun."
        )
    (work / "fleet_scale.md").write_text("\n".join(md) + "\n")
    (work / "fleet_scale.json").write_text(
        json.dumps({"meta": meta, "sizes": sizes, "upload": upload}, indent=1)
    )
    plot(work, sizes, meta)


def plot(work: Path, sizes: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sizes:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    commands = [t["command"] for t in sizes[0]["steps"]] if sizes else []
    for cmd in commands:
        ns, secs, mems = [], [], []
        for s in sizes:
            for t in s["steps"]:
                if t["command"] == cmd and t["seconds"] == t["seconds"]:
                    ns.append(s["n"])
                    secs.append(t["seconds"])
                    mems.append(t["peak_rss_mb"])
        ax_t.plot(ns, secs, marker="o", label=cmd)
        ax_m.plot(ns, mems, marker="o", label=cmd)
    ax_t.set(xlabel="devices (N)", ylabel="wall time (s)", title="time per command")
    ax_m.set(xlabel="devices (N)", ylabel="peak RSS of edgepack (MB)", title="memory of the edgepack process")
    for ax in (ax_t, ax_m):
        ax.set_xticks([s["n"] for s in sizes])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"edgepack fleet over network namespaces ({meta['link']}; {meta['cpu']}, {meta['cores']} cores)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(work / "fleet_scale.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_delayline"]:
        listen, target, delay_ms = argv[1:4]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_delay_line(listen, target, float(delay_ms) / 1000))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/fleet-scale"), help="bundles, logs, the table and plot"
    )
    p.add_argument("--sizes", default="10,50,100", help="fleet sizes N (default: 10,50,100)")
    p.add_argument("--delay-ms", type=float, default=100.0, help="link delay, each direction (default: 100)")
    p.add_argument("--loss", type=float, default=1.0, help="packet loss %%, each direction (default: 1)")
    p.add_argument("--rate-mbit", type=float, default=5.0, help="link rate, each direction (default: 5)")
    p.add_argument("--jobs", type=int, default=8, help="edgepack's --jobs (default: 8, edgepack's default)")
    p.add_argument("--runs", type=int, default=20, help="fleet bench --runs per device (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="fleet bench --warmup per device (default: 5)")
    p.add_argument("--timeout", type=float, default=600, help="one command's limit in seconds (default: 600)")
    p.add_argument("--size-budget", type=float, default=900, help="one N's limit in seconds (default: 900)")
    p.add_argument(
        "--bundle", type=Path, default=None, help="the bundle the scale runs ship (default: a tiny one)"
    )
    p.add_argument(
        "--big-bundle", type=Path, default=None, help="the ~20 MB upload (default: the teacher packed)"
    )
    p.add_argument("--no-upload-test", action="store_true", help="skip the cut-link upload")
    p.add_argument(
        "--upload-loss", type=float, default=0.0, help="loss %% during the upload test (default: 0)"
    )
    p.add_argument("--cuts", default="5,30", help="cut lengths in seconds (default: 5,30)")
    p.add_argument("--upload-repeats", type=int, default=2, help="clean uploads timed (default: 2)")
    p.add_argument("--net", type=int, default=213, help="the devices use 10.NET.0.0/16 (default: 213)")
    p.add_argument(
        "--cleanup", action="store_true", help="remove namespaces and directories a killed run left"
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from --work's JSON")
    args = p.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.work / "fleet_scale.json").read_text())
        write_report(args.work.resolve(), saved["meta"], saved["sizes"], saved["upload"])
        return 0
    if args.cleanup:
        cleanup()
        return 0
    args.cuts = [float(c) for c in args.cuts.split(",") if c]
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        print(
            "fleet_scale: needs root, iproute2 and nftables (apt-get install iproute2 nftables)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    profile = write_profile(work)
    template = template_venv(work)
    bundle = (args.bundle or small_bundle(work)).resolve()
    meta = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "link": str(Link(args.delay_ms, args.loss, args.rate_mbit)),
        "jobs": args.jobs,
        "bundle_mb": bundle_mb(bundle),
        "runs": args.runs,
        "warmup": args.warmup,
        "command": "python benchmarks/fleet_scale.py " + " ".join(argv),
    }
    say(f"bundle {bundle} ({meta['bundle_mb']:.2f} MB); link {meta['link']}")
    sizes: list[dict] = []
    upload = None
    try:
        for n in [int(x) for x in args.sizes.split(",") if x]:
            sizes.append(run_size(n, args, work, bundle, template, profile))
            write_report(work, meta, sizes, upload)
        if not args.no_upload_test:
            big = (args.big_bundle or big_bundle(work)).resolve()
            upload = upload_test(args, work, big, template, profile)
    except KeyboardInterrupt:
        say("interrupted: the namespaces are removed; the figures so far are written")
        return 130
    finally:
        write_report(work, meta, sizes, upload)
        say(f"table: {work / 'fleet_scale.md'}; plot: {work / 'fleet_scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
