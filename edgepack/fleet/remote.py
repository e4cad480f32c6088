"""Small programs run with the device's own Python (``python -c PROGRAM ARGS``), standard library only:
they work before onnxruntime is installed, under an emulator's command prefix, and the same way over
SSH and locally.

- ``PROBE``: Python version, runtime packages, CPU architecture, flags and physical cores as read on
  the device. The CPU functions are ``runtime_shim.tune``'s own source, sent along, so the device
  detects exactly as the shim does.
- ``LAYOUT``: the release layout of a bundle on the device, switched atomically::

      <remote_dir>/<bundle>/releases/<digest16>/   one directory per deployed manifest
      <remote_dir>/<bundle>/releases/.incoming-*   an upload in progress (never loaded)
      <remote_dir>/<bundle>/current  -> releases/<digest16>   what runs (a symlink, replaced by rename)
      <remote_dir>/<bundle>/previous -> releases/<digest16>   what --rollback restores
      <remote_dir>/<bundle>/results/               JSON written by fleet bench and tune

  A symlink replaced with ``rename(2)`` is atomic: a reader sees the old release or the new one,
  never a half-copied directory, and an upload cut off half-way leaves ``current`` untouched.
"""

from __future__ import annotations

import inspect
import textwrap

from runtime_shim import cpu as _shim_cpu

RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
SETUP_VENV = "venv"  # <remote_dir>/venv: created by `deploy --setup`, used from then on


def _probe_source() -> str:
    # The shim's own CPU module (standard library only), sent whole: the device reads its CPU exactly
    # as the shim there will (EDGEPACK_CPU_FLAGS included).
    cpu = inspect.getsource(_shim_cpu)
    return cpu + textwrap.dedent('''
        import json, os, platform, subprocess, sys
        from pathlib import Path
        from importlib import metadata
        ''') + textwrap.dedent(f'''

        def _version(name):
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                return None

        root = os.path.abspath(os.path.expanduser(sys.argv[1]))
        setup = os.path.join(root, {SETUP_VENV!r}, "bin", "python")
        arch, flags = cpu_flags()
        print(json.dumps({{
            "python": platform.python_version(), "executable": sys.executable,
            "implementation": platform.python_implementation(),
            "machine": platform.machine(), "system": platform.system(), "node": platform.node(),
            "packages": {{n: _version(n) for n in {RUNTIME_PACKAGES!r}}},
            "arch": arch, "flags": sorted(flags), "physical_cores": physical_cores(), "cpus": os.cpu_count(),
            "remote_dir": root, "setup_python": setup if os.path.exists(setup) else None,
        }}))
        ''')


PROBE = _probe_source()

LAYOUT = textwrap.dedent('''
    import json, os, shutil, sys, uuid

    def link(root, name):
        p = os.path.join(root, name)
        return os.path.basename(os.readlink(p)) if os.path.islink(p) else None

    def point(root, name, release):
        # A new symlink beside the old one, renamed over it: rename(2) is atomic and does not follow it.
        tmp = os.path.join(root, ".%s.%s" % (name, uuid.uuid4().hex))
        os.symlink(os.path.join("releases", release), tmp)
        os.replace(tmp, os.path.join(root, name))

    def state(root):
        rel = os.path.join(root, "releases")
        names = sorted(os.listdir(rel)) if os.path.isdir(rel) else []
        return {"root": root, "current": link(root, "current"), "previous": link(root, "previous"),
                "releases": [n for n in names if not n.startswith(".")],
                "incoming": [n for n in names if n.startswith(".incoming-")]}

    def prune(root, keep):
        rel = os.path.join(root, "releases")
        for n in os.listdir(rel):
            if n not in keep:
                shutil.rmtree(os.path.join(rel, n), ignore_errors=True)

    cmd, root = sys.argv[1], os.path.abspath(os.path.expanduser(sys.argv[2]))
    args = sys.argv[3:]
    if cmd == "state":
        out = state(root)
    elif cmd == "bundles":
        out = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                     if os.path.islink(os.path.join(root, n, "current")))
    elif cmd == "incoming":
        # The upload goes beside the releases it will join (same file system: the commit is a rename).
        path = os.path.join(root, "releases", ".incoming-%s-%s" % (args[0], uuid.uuid4().hex[:8]))
        os.makedirs(path)
        os.makedirs(os.path.join(root, "results"), exist_ok=True)
        out = {"path": path}
    elif cmd == "commit":
        incoming, release = args
        dest = os.path.join(root, "releases", release)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.rename(incoming, dest)
        out = {"path": dest}
    elif cmd == "activate":
        release = args[0]
        old = link(root, "current")
        point(root, "current", release)
        if old and old != release:
            point(root, "previous", old)
        s = state(root)
        prune(root, {s["current"], s["previous"]})
        out = state(root)
    elif cmd == "rollback":
        cur, prev = link(root, "current"), link(root, "previous")
        if not prev or not os.path.isdir(os.path.join(root, "releases", prev)):
            print(json.dumps({"error": "no previous release under %s; nothing to roll back to" % root}))
            sys.exit(3)
        point(root, "current", prev)
        if cur:
            point(root, "previous", cur)
        out = state(root)
    elif cmd == "rmtree":
        target = os.path.abspath(args[0])
        if os.path.dirname(os.path.dirname(target)) == root:  # only inside <root>/releases
            shutil.rmtree(target, ignore_errors=True)
        out = {"removed": target}
    else:
        raise SystemExit("unknown layout command %r" % cmd)
    print(json.dumps(out))
''')
