"""Small programs run with the device's own Python (``python -I -c PROGRAM ARGS``), standard library
only: they work before the runtime is installed, under an emulator's command prefix, and the same way
over SSH and locally. ``-I``: nothing is imported from the working directory or the user's site.

- ``PROBE``: Python version, runtime packages, CPU architecture, flags and physical cores as read on
  the device, the account, and the installed runtime (``runtime``). The CPU functions are
  ``runtime_shim.cpu``'s own source, sent along, so the device detects exactly as the shim does.
- ``LAYOUT``: the release layout of a bundle on the device, switched atomically::

      <remote_dir>/<bundle>/releases/<digest16>/   one directory per deployed manifest
      <remote_dir>/<bundle>/releases/.incoming-*   an upload in progress (never loaded; removed when
                                                   the upload fails or is interrupted)
      <remote_dir>/<bundle>/current  -> releases/<digest16>   what runs (a symlink, replaced by rename)
      <remote_dir>/<bundle>/previous -> releases/<digest16>   what --rollback restores
      <remote_dir>/<bundle>/results/               JSON written by fleet bench and tune

  A symlink replaced with ``rename(2)`` is atomic: a reader sees the old release or the new one,
  never a half-copied directory, and an upload cut off half-way leaves ``current`` untouched.
  ``slot`` binds ``<remote_dir>/<bundle>`` to the bundle name it accepted, in the runtime's state.
- ``GUARD``: runs a command over SSH in its own process group and stops the group when the channel's
  stdin closes (Ctrl-C on this machine, a dropped link): no benchmark keeps running on a device
  after the command that started it is gone. Syntax any Python 3 reads.
- ``ANCHORS``: creates the runtime directory (``runtime.RuntimeDir``) and sets its modes: readable by
  every account, writable only by the one that deploys.
"""

from __future__ import annotations

import inspect
import textwrap

from runtime_shim import cpu as _shim_cpu

from ..runtime_dist import MIN_PYTHON

RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
PROBED_PACKAGES = (*RUNTIME_PACKAGES, "cryptography")  # cryptography: what a signed_only device also needs
RUNTIME_VENV = "venv"  # <runtime_dir>/venv: the installed runtime
ROOT_RUNTIME_DIR = "/opt/edgepack-runtime"  # deploying as root: outside every account's home
USER_RUNTIME_DIR = "~/.local/share/edgepack-runtime"  # deploying as an ordinary account: its own (unprotected)


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

        def _exposed(path):
            # Who else could replace the runtime: any directory from it up to / that an account other
            # than root owns, or that others may write (a sticky /tmp excepted).
            out, p = [], path
            while True:
                if os.path.exists(p):
                    st = os.stat(p)
                    if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
                        out.append(p)
                parent = os.path.dirname(p)
                if parent == p:
                    return out
                p = parent

        root = os.path.abspath(os.path.expanduser(sys.argv[1]))
        uid = os.geteuid() if hasattr(os, "geteuid") else None
        rt = os.path.abspath(os.path.expanduser(sys.argv[2] or ({ROOT_RUNTIME_DIR!r} if uid == 0 else {USER_RUNTIME_DIR!r})))
        rt_python = os.path.join(rt, {RUNTIME_VENV!r}, "bin", "python")
        try:
            with open(os.path.join(rt, {RUNTIME_VENV!r}, "edgepack-runtime.json")) as f:
                installed = json.load(f)
        except (OSError, ValueError):
            installed = None
        arch, flags = cpu_flags()
        print(json.dumps({{
            "python": platform.python_version(), "executable": sys.executable,
            "implementation": platform.python_implementation(),
            "machine": platform.machine(), "system": platform.system(), "node": platform.node(),
            "packages": {{n: _version(n) for n in {PROBED_PACKAGES!r}}},
            "arch": arch, "flags": sorted(flags), "physical_cores": physical_cores(), "cpus": os.cpu_count(),
            "remote_dir": root, "uid": uid, "runtime_dir": rt,
            "runtime_python": rt_python if os.path.exists(rt_python) else None, "runtime": installed,
            "runtime_exposed": _exposed(rt),
        }}))
        ''')


# The version check first, in syntax any Python 3 reads: an older Python answers with its version
# (one line for the user) instead of a SyntaxError or a TypeError from the probe's own code.
PROBE = textwrap.dedent(f'''
    import json, platform, sys
    if sys.version_info[:2] < {tuple(MIN_PYTHON)!r}:
        print(json.dumps({{"python": platform.python_version(), "executable": sys.executable, "too_old": True}}))
        sys.exit(0)
    exec(compile({_probe_source()!r}, "<edgepack probe>", "exec"))
''')

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
        # Named by the caller (release, token): a Ctrl-C between this mkdir and its answer still knows
        # what to remove.
        path = os.path.join(root, "releases", ".incoming-%s-%s" % (args[0], args[1] if len(args) > 1 else
                                                                    uuid.uuid4().hex[:8]))
        os.makedirs(path)
        os.makedirs(os.path.join(root, "results"), exist_ok=True)
        out = {"path": path}
    elif cmd == "commit":
        incoming, release = args
        dest = os.path.join(root, "releases", release)
        aside = None
        if os.path.isdir(dest):  # a damaged copy of the same release: moved aside, replaced, then removed
            aside = os.path.join(root, "releases", ".replaced-%s-%s" % (release, uuid.uuid4().hex[:8]))
            os.rename(dest, aside)
        os.rename(incoming, dest)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
        out = {"path": dest}
    elif cmd == "space":
        # Free bytes for this account on the file system that holds (or will hold) root.
        p = root
        while not os.path.exists(p):
            p = os.path.dirname(p)
        st = os.statvfs(p)
        out = {"free": st.f_bavail * st.f_frsize, "path": p}
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
    elif cmd == "slot":
        # The bundle name a slot accepted, kept in the runtime's state (outside every release).
        slots_file, name, write, rename = args
        try:
            with open(slots_file) as f:
                slots = json.load(f).get("slots", {})
        except FileNotFoundError:
            slots = {}
        bound = slots.get(root)
        if bound and bound != name and rename != "1":
            print(json.dumps({"error": "holds bundle %r, and this bundle is %r: pass --rename to put it in "
                                       "this slot, or deploy it under its own --name" % (bound, name)}))
            sys.exit(3)
        if write == "1" and bound != name:
            slots[root] = name
            tmp = "%s.%s" % (slots_file, uuid.uuid4().hex)
            with open(tmp, "w") as f:
                json.dump({"format": "edgepack-slots/1", "slots": slots}, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, slots_file)
        out = {"slot": root, "name": name, "was": bound}
    elif cmd == "rmtree":
        target = os.path.abspath(args[0])
        if os.path.dirname(os.path.dirname(target)) == root:  # only inside <root>/releases
            shutil.rmtree(target, ignore_errors=True)
        out = {"removed": target}
    else:
        raise SystemExit("unknown layout command %r" % cmd)
    print(json.dumps(out))
''')

ANCHORS = textwrap.dedent('''
    import json, os, sys

    # mkdir the runtime directory, its keys/ state/ wheels/, and give every part of it the modes a
    # reader needs and no more: directories 0755, files 0644 (keys, state, the anchors file).
    rt = os.path.abspath(os.path.expanduser(sys.argv[1]))
    for d in (rt, *(os.path.join(rt, n) for n in ("keys", "state", "wheels"))):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
    for d in ("keys", "state", "wheels"):
        for n in os.listdir(os.path.join(rt, d)):
            p = os.path.join(rt, d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                os.chmod(p, 0o644)
    anchors = os.path.join(rt, "venv", "edgepack-runtime.json")
    if os.path.isfile(anchors):
        os.chmod(anchors, 0o644)
    print(json.dumps({"runtime_dir": rt}))
''')

GUARD = textwrap.dedent('''
    import os, signal, subprocess, sys, threading
    try:
        child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        sys.stderr.write("%s: %s\\n" % (sys.argv[1], e.strerror or e))
        sys.exit(127)

    def stop(*_):
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except OSError:
            pass

    def watch():
        # sshd closes this stdin when the client or the link goes: stop what the command started.
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        stop()

    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)
    watcher = threading.Thread(target=watch)
    watcher.daemon = True
    watcher.start()
    code = child.wait()
    sys.exit(128 - code if code < 0 else code)
''')
