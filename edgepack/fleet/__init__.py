"""The fleet: bundles deployed to devices over SSH (or to a local runtime-only Python), tuned and
benchmarked there, and one report across the devices.

- ``inventory``: ``devices.toml``, one typed, frozen ``Device`` per table.
- ``transport``: how commands run and files travel: ``SSHTransport`` (asyncssh, host keys checked
  against ``known_hosts``) and ``LocalTransport`` (a directory and a Python on this machine).
- ``session``: a connected device (what the probe read there) and the runner that works on many
  devices at once.
- ``remote``: the small standard-library programs run with the device's Python (probe the CPU,
  packages and installed runtime, switch releases atomically, bind slots).
- ``runtime``: the installed runtime on a device (``edgepack-runtime`` from this machine's
  ``runtime_shim``) and the trust anchors beside it; ``--setup``; ``Session.runtime`` runs it, isolated.
- ``deploy``: check a signed_only device's bundle here first, upload beside the destination, check it
  on the device with the installed runtime, switch ``current`` atomically, keep ``previous``; rollback.
- ``service``: the model service a device runs (``service = "NAME"``): its systemd unit (``--setup``),
  and the SIGHUP after each switch of ``current``, waiting until it serves the new release.
- ``bench``: the installed runtime's ``bench|tune`` on each device, results pulled back and checked
  against the build-time figures of the manifest.
- ``rollout``: a bundle to a group in waves (a canary first), each wave deployed, benchmarked and gated
  on the build-time accuracy and the profiles' budgets; a failed gate rolls back what it switched.
- ``report``: ``fleet.html``, ``fleet.md``, ``fleet.json`` and ``fleet.png`` across devices;
  ``compare``: two result sets side by side, and the ``fleet tune`` table.

Every device runs in its own task: one that is down or refuses its host key fails alone, and the
command's exit code says the fleet was partial (``ExitCode.PARTIAL``, ``runtime_shim.exitcodes``).
"""

from __future__ import annotations

from ..console import Progress

# A library call's default log: INFO records of the edgepack.fleet logger, nothing printed.
QUIET = Progress("fleet")


class DeviceError(Exception):
    """One device failed (unreachable, host key refused, verify failed). ``str(err)`` is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
