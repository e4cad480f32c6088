"""A real OpenSSH ``sshd`` on 127.0.0.1 for the fleet tests: host key and config generated into a
directory, public-key login only, stopped by the caller (``Sshd.stop``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    port: int
    host_key: Path
    proc: subprocess.Popen

    def fingerprint(self) -> str:
        import asyncssh

        return asyncssh.read_private_key(str(self.host_key)).get_fingerprint("sha256")

    def known_hosts_line(self) -> str:
        import asyncssh

        pub = asyncssh.read_private_key(str(self.host_key)).export_public_key("openssh").decode().split()
        return f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_sshd(root: Path, authorized_keys: Path) -> Sshd:
    import asyncssh

    root.mkdir(parents=True)
    host_key = root / "ssh_host_ed25519_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(host_key))
    host_key.chmod(0o600)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {authorized_keys}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    log = open(root / "sshd.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited {proc.returncode}: {(root / 'sshd.log').read_text()[-1000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return Sshd(port, host_key, proc)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("sshd did not start listening")
