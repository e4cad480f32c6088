"""Signed bundles on a real packed tiny bundle: ``edgepack keys``/``sign``, ``runtime_shim verify --keys``,
``unpack``, and the attack matrix of docs/TRUST.md, each refused with one line and a non-zero exit."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import runtime_shim
from edgepack.cli import main as edgepack_main
from edgepack.errors import EdgepackError
from edgepack.signing import (
    SignConfig,
    default_version,
    key_id_of,
    load_private_key,
    new_keypair,
    sign_bundle,
    write_signature,
)
from runtime_shim import BundleError, OnnxPipeline, onnxcheck
from runtime_shim import trust as T
from runtime_shim.__main__ import ExitCode
from runtime_shim.__main__ import main as shim_main
from runtime_shim.manifest import bundle_files, read_manifest, update_manifest

ROOT = Path(__file__).resolve().parents[1]
SHIM_PARENT = Path(runtime_shim.__file__).resolve().parent.parent
QUERY = "what is my checking balance"


@pytest.fixture(autouse=True)
def _device_env(monkeypatch, tmp_path):
    """Each test is a fresh device: its own state file, no keys or passphrase from the environment."""
    monkeypatch.setenv(T.STATE_ENV, str(tmp_path / "state" / "accepted.json"))
    for name in (T.KEYS_ENV, "EDGEPACK_KEY_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    """(private key, trusted keys directory holding only its .pub)."""
    d = tmp_path_factory.mktemp("keys")
    private, public, _ = new_keypair(d / "build")
    trusted = d / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return private, trusted


@pytest.fixture(scope="module")
def other_key(tmp_path_factory) -> Path:
    return new_keypair(tmp_path_factory.mktemp("other"), name="attacker")[0]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def signed_master(tmp_path_factory, tiny_bundle, keypair) -> Path:
    b = _copy(tiny_bundle, tmp_path_factory.mktemp("signed") / "tiny")
    sign_bundle(b, keypair[0], version=100, profile="edge-x86")
    return b


@pytest.fixture
def signed(tmp_path, signed_master) -> Path:
    return _copy(signed_master, tmp_path / "bundle")


@pytest.fixture
def unsigned(tmp_path, tiny_bundle) -> Path:
    return _copy(tiny_bundle, tmp_path / "unsigned")


def refused(argv: list[str], capsys, *needles: str, cli=shim_main) -> str:
    """Run a command that must refuse: exit 2, exactly one line on stderr holding every needle."""
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE == 2, err
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------------------- keys


def test_keys_new_writes_a_0600_private_key_and_prints_the_id(tmp_path, capsys, monkeypatch):
    out = tmp_path / "k"
    assert edgepack_main(["keys", "new", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    private, public = out / "signing.key", out / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert b"ENCRYPTED" not in private.read_bytes() and "NOT encrypted" in printed
    keyid = re.search(r"key id: ([0-9a-f]{16})$", printed.strip()).group(1)
    assert keyid == key_id_of(public) == key_id_of(private)
    raw = T.raw_public_key(T.load_public_key(public))
    assert keyid == hashlib.sha256(raw).hexdigest()[:16]  # the documented id
    refused(["keys", "new", "--out", str(out)], capsys, "signing.key", "--force", cli=edgepack_main)

    # A passphrase comes from the environment only: there is no flag that would put it in argv.
    help_text = subprocess.run([sys.executable, "-m", "edgepack", "keys", "new", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "passphrase" not in help_text.replace("EDGEPACK_KEY_PASSPHRASE", "")
    monkeypatch.setenv("EDGEPACK_KEY_PASSPHRASE", "correct horse")
    assert edgepack_main(["keys", "new", "--out", str(out), "--name", "enc"]) == 0
    assert b"ENCRYPTED PRIVATE KEY" in (out / "enc.key").read_bytes()
    assert stat.S_IMODE((out / "enc.key").stat().st_mode) == 0o600
    load_private_key(out / "enc.key")
    monkeypatch.setenv("EDGEPACK_KEY_PASSPHRASE", "wrong")
    with pytest.raises(EdgepackError, match="wrong passphrase"):
        load_private_key(out / "enc.key")
    monkeypatch.delenv("EDGEPACK_KEY_PASSPHRASE")
    with pytest.raises(EdgepackError, match="encrypted; export EDGEPACK_KEY_PASSPHRASE"):
        load_private_key(out / "enc.key")


def test_sign_config_validates():
    assert SignConfig().to_dict() == {"key": "", "name": ""} and not SignConfig().enabled
    assert SignConfig.from_dict({"key": "k/signing.key", "name": "clinc150"}).enabled
    with pytest.raises(ValueError, match="public key"):
        SignConfig(key="k/signing.pub")
    with pytest.raises(ValueError, match="not a bundle name"):
        SignConfig(name="../x")
    with pytest.raises(ValueError, match="unknown key"):
        SignConfig.from_dict({"keys": "x"})


def test_versions_only_increase():
    assert default_version(now=1796109480) == 20261201071800
    assert default_version(previous=20261201071800, now=1796109480) == 20261201071801
    assert default_version(previous=5, now=1796109480) == 20261201071800


# ---------------------------------------------------------------------------------------- sign


def test_sign_writes_a_documented_envelope_over_the_exact_manifest(unsigned, keypair, capsys):
    before = (unsigned / "requirements.txt").read_text()
    assert "cryptography" not in before  # an unsigned bundle's device needs no cryptography
    assert T.is_signed(unsigned) is False
    assert edgepack_main(["sign", str(unsigned), "--key", str(keypair[0]), "--version", "7", "--profile", "pi5"]) == 0
    assert "unsigned version 7 for profile pi5" in capsys.readouterr().out
    assert T.is_signed(unsigned) is True

    manifest = read_manifest(unsigned)
    assert (manifest["name"], manifest["version"], manifest["profile"]) == ("unsigned", 7, "pi5")
    assert manifest["target"]["name"]  # from pack
    # Every file is covered, the shim's sources included; only the manifest and its signature are not.
    on_disk = {p.relative_to(unsigned).as_posix() for p in unsigned.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "manifest.sig"} == set(bundle_files(unsigned))
    assert {"runtime_shim/trust.py", "runtime_shim/manifest.py", "runtime_shim/__main__.py"} <= set(manifest["files"])
    assert (unsigned / "requirements.txt").read_text() == before  # sign changes the manifest and its signature only

    env = json.loads((unsigned / "manifest.sig").read_text())
    data = (unsigned / "manifest.json").read_bytes()
    assert set(env) == {"format", "payloadType", "payload", "payloadSha256", "signatures"}
    assert env["payloadSha256"] == hashlib.sha256(data).hexdigest()
    (s,) = env["signatures"]
    assert s["alg"] == "ed25519" and s["keyid"] == key_id_of(keypair[0])
    # Checked here with cryptography alone, from the documented format (DSSE PAE over the file's bytes).
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pub = load_pem_public_key((keypair[1] / "signing.pub").read_bytes())
    ptype = b"application/vnd.edgepack.manifest+json"
    pub.verify(base64.b64decode(s["sig"]), b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(data), data))

    # Re-signing keeps the name and moves the version up.
    sign_bundle(unsigned, keypair[0])
    assert read_manifest(unsigned)["name"] == "unsigned" and read_manifest(unsigned)["version"] > 7


def test_sign_refuses_what_a_device_would_refuse(unsigned, keypair):
    (unsigned / "labels.json").write_text("{}")
    with pytest.raises(EdgepackError, match="not signing: .*labels.json.*changed after packing"):
        sign_bundle(unsigned, keypair[0])
    assert not (unsigned / "manifest.sig").exists()
    with pytest.raises(EdgepackError, match="public key"):
        sign_bundle(unsigned, keypair[1] / "signing.pub")


# ------------------------------------------------------------------------------------- good paths


def test_signed_bundle_loads_with_keys(signed, keypair, capsys, monkeypatch, tiny_bundle):
    assert shim_main(["verify", str(signed), "--keys", str(keypair[1])]) == 0
    out = capsys.readouterr().out
    assert f"signed by key {key_id_of(keypair[0])}" in out and "tiny version 100" in out

    pipe = OnnxPipeline(signed, trusted_keys=keypair[1])
    assert pipe.trust.signed and pipe.trust.version == 100 and pipe.trust.name == "tiny"
    assert pipe(QUERY) == OnnxPipeline(tiny_bundle)(QUERY)
    monkeypatch.setenv(T.KEYS_ENV, str(keypair[1]))
    assert OnnxPipeline(signed).trust.key_id == key_id_of(keypair[0])
    assert shim_main(["predict", str(signed), QUERY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] == pipe(QUERY)[0]["label"]
    state = json.loads(T.state_path().read_text())
    assert state["format"] == "edgepack-accepted/1" and state["bundles"]["tiny"]["version"] == 100


def test_unsigned_bundle_loads_without_keys(unsigned, capsys):
    assert shim_main(["verify", str(unsigned)]) == 0
    assert "signature not checked" in capsys.readouterr().out
    assert OnnxPipeline(unsigned).trust.signed is False
    assert shim_main(["predict", str(unsigned), QUERY]) == 0
    assert not T.state_path().exists()  # nothing recorded without keys


def test_keys_false_ignores_the_environment(unsigned, keypair, monkeypatch, capsys):
    """The build machine checks the unsigned bundles it is making, whatever EDGEPACK_TRUSTED_KEYS says."""
    monkeypatch.setenv(T.KEYS_ENV, str(keypair[1]))
    refused(["verify", str(unsigned)], capsys, "unsigned")
    assert OnnxPipeline(unsigned, trusted_keys=False).trust.signed is False


# ----------------------------------------------------------------------------------- attack matrix


def _bump_a_bias(bundle: Path) -> None:
    """What a user tried on the demo bundle: add 100 to one classifier bias."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    labels = len(json.loads((bundle / "labels.json").read_text())["labels"])
    model = onnx.load(bundle / "model.quant.onnx")
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.shape == (labels,):
            arr = arr.copy()
            arr[0] += 100
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    else:
        raise AssertionError("no classifier bias found")
    onnx.save(model, bundle / "model.quant.onnx")


def _external_data_model(bundle: Path) -> str:
    """One initializer moved to an external file outside the bundle (the ONNX path traversal CVEs)."""
    import onnx

    model = onnx.load(bundle / "model.quant.onnx")
    init = next(t for t in model.graph.initializer if t.raw_data)
    (bundle.parent / "outside.bin").write_bytes(init.raw_data)
    length = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = k, v
    onnx.save(model, bundle / "model.quant.onnx")
    return init.name


def _resign_raw(bundle: Path, key: Path) -> None:
    """A key holder signing whatever manifest.json holds (sign_bundle would refuse to)."""
    write_signature(bundle, load_private_key(key))


def _manifest_edit(bundle: Path, edit) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


ATTACKS = {
    # the model changed and the manifest rewritten by `verify --update`
    "model_changed": (lambda b, k, o: (_bump_a_bias(b), shim_main(["verify", str(b), "--update"])),
                      ["manifest.json", "does not match its signature", "re-sign"]),
    "other_key": (lambda b, k, o: sign_bundle(b, o), ["manifest.sig", "not in", "copy their .pub"]),
    "truncated_sig": (lambda b, k, o: (b / "manifest.sig").write_bytes((b / "manifest.sig").read_bytes()[:150]),
                      ["manifest.sig", "not valid JSON"]),
    "garbled_sig_bits": (lambda b, k, o: _garble(b, flip=True), ["manifest.json", "does not match its signature"]),
    "garbled_sig_base64": (lambda b, k, o: _garble(b, flip=False), ["manifest.sig", "truncated or garbled"]),
    "unsigned": (lambda b, k, o: (b / "manifest.sig").unlink(), ["manifest.sig", "unsigned", "edgepack sign"]),
    "extra_file": (lambda b, k, o: (b / "numpy.py").write_text("import os\n"), ["numpy.py", "not listed", "delete"]),
    "symlink": (lambda b, k, o: os.symlink("/etc/passwd", b / "runtime_shim" / "passwd"),
                ["runtime_shim/passwd", "symlink", "/etc/passwd"]),
    "pycache": (lambda b, k, o: ((b / "runtime_shim" / "__pycache__").mkdir(),
                                 (b / "runtime_shim" / "__pycache__" / "trust.cpython-311.pyc").write_bytes(b"x")),
                ["__pycache__/trust.cpython-311.pyc", "not listed", "installed runtime"]),
    "external_data": (lambda b, k, o: (_external_data_model(b), update_manifest(b), _resign_raw(b, k)),
                      ["model.quant.onnx", "external data file", "re-export"]),
    "duplicated_key": (lambda b, k, o: ((b / "manifest.json").write_bytes(
                           (b / "manifest.json").read_bytes().replace(b'{\n  "format"', b'{\n  "version": 999,\n  "format"', 1)),
                        _resign_raw(b, k)),
                       ["manifest.json", "duplicated key 'version'"]),
    "path_outside": (lambda b, k, o: (_manifest_edit(b, lambda m: m["files"].update({"../outside.bin": {"sha256": "0"}})),
                                      _resign_raw(b, k)),
                     ["manifest.json", "'../outside.bin'", "outside the bundle"]),
    "absolute_path": (lambda b, k, o: (_manifest_edit(b, lambda m: m["files"].update({"/etc/passwd": {"sha256": "0"}})),
                                       _resign_raw(b, k)),
                      ["'/etc/passwd'", "outside the bundle"]),
    "no_version": (lambda b, k, o: (_manifest_edit(b, lambda m: m.pop("version")), _resign_raw(b, k)),
                   ["manifest.json", "version None", "--version"]),
}


def _garble(bundle: Path, *, flip: bool) -> None:
    env = json.loads((bundle / "manifest.sig").read_text())
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    if flip:
        sig[10] ^= 0x01
        env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    else:
        env["signatures"][0]["sig"] = env["signatures"][0]["sig"][:40] + "!!"
    (bundle / "manifest.sig").write_text(json.dumps(env))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_refused(attack, signed, keypair, other_key, capsys):
    tamper, needles = ATTACKS[attack]
    tamper(signed, keypair[0], other_key)
    refused(["verify", str(signed), "--keys", str(keypair[1])], capsys, *needles)
    refused(["predict", str(signed), QUERY, "--keys", str(keypair[1])], capsys, *needles)
    with pytest.raises(BundleError):
        OnnxPipeline(signed, trusted_keys=keypair[1])
    assert not T.state_path().exists()  # nothing refused is ever recorded as accepted


def test_update_makes_the_tamper_pass_checksums_only(signed, keypair, capsys):
    """The hole the issue describes, and that keys close it: `verify --update` re-blesses a changed model."""
    _bump_a_bias(signed)
    assert shim_main(["verify", str(signed), "--update"]) == 0
    assert "manifest.sig no longer matches" in capsys.readouterr().out
    assert shim_main(["verify", str(signed)]) == 0  # checksums alone: passes
    refused(["verify", str(signed), "--keys", str(keypair[1])], capsys, "does not match its signature")


def test_older_version_after_a_newer_one(tmp_path, signed_master, keypair, capsys):
    new = _copy(signed_master, tmp_path / "new")
    old = _copy(signed_master, tmp_path / "old")
    sign_bundle(new, keypair[0], name="tiny", version=200)
    sign_bundle(old, keypair[0], name="tiny", version=150)
    keys = ["--keys", str(keypair[1])]
    assert shim_main(["verify", str(new), *keys]) == 0
    refused(["verify", str(old), *keys], capsys, "tiny: version 150 is older than version 200", "--allow-downgrade")
    refused(["predict", str(old), QUERY, *keys], capsys, "older than version 200")
    with pytest.raises(BundleError, match="older"):
        OnnxPipeline(old, trusted_keys=keypair[1])
    assert shim_main(["verify", str(old), *keys, "--allow-downgrade"]) == 0  # on purpose: now the last accepted
    assert OnnxPipeline(old, trusted_keys=keypair[1]).trust.version == 150
    assert shim_main(["verify", str(new), *keys]) == 0

    # The same version with other contents (mix-and-match) is refused too.
    other = _copy(signed_master, tmp_path / "other")
    (other / "eval.jsonl").write_text((other / "eval.jsonl").read_text().splitlines()[0] + "\n")
    update_manifest(other)
    sign_bundle(other, keypair[0], name="tiny", version=200)
    refused(["verify", str(other), *keys], capsys, "version 200 was accepted on this device with a different manifest")


def test_bad_trust_configuration_is_one_line(signed, tmp_path, capsys, monkeypatch):
    refused(["verify", str(signed), "--keys", str(tmp_path / "nowhere")], capsys, "nowhere", "trusted keys directory")
    (tmp_path / "empty").mkdir()
    refused(["verify", str(signed), "--keys", str(tmp_path / "empty")], capsys, "no *.pub public keys")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.pub").write_text("not a key")
    refused(["verify", str(signed), "--keys", str(tmp_path / "bad")], capsys, "x.pub", "not a PEM public key")
    T.state_path().parent.mkdir(parents=True)
    T.state_path().write_text("{")
    monkeypatch.setenv(T.KEYS_ENV, str(tmp_path / "bad"))
    refused(["verify", str(signed)], capsys, "x.pub")


def test_state_file_corrupt_is_refused(signed, keypair, capsys):
    T.state_path().parent.mkdir(parents=True)
    T.state_path().write_text("{")
    refused(["verify", str(signed), "--keys", str(keypair[1])], capsys, "accepted.json", "state file")


def test_duplicated_key_refused_without_keys_too(unsigned, capsys):
    path = unsigned / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'{\n  "format"', b'{\n  "files": {},\n  "format"', 1))
    refused(["verify", str(unsigned)], capsys, "manifest.json", "duplicated key 'files'")


# ------------------------------------------------------------------------------------ ONNX walk


def test_onnx_walk_matches_the_onnx_schema_and_finds_external_data(tiny_bundle, tmp_path):
    import onnx

    kinds = {"model": onnx.ModelProto, "graph": onnx.GraphProto, "node": onnx.NodeProto,
             "attribute": onnx.AttributeProto, "sparse": onnx.SparseTensorProto, "function": onnx.FunctionProto,
             "training": onnx.TrainingInfoProto, "tensor": onnx.TensorProto}
    by_type = {cls.DESCRIPTOR.full_name: kind for kind, cls in kinds.items()}
    for kind, cls in kinds.items():
        if kind == "tensor":
            continue
        holders = {f.number: by_type[f.message_type.full_name] for f in cls.DESCRIPTOR.fields
                   if f.message_type is not None and f.message_type.full_name in by_type}
        assert holders == onnxcheck._ONNX_FIELDS[kind], kind
    fields = {f.name: f.number for f in onnx.TensorProto.DESCRIPTOR.fields}
    assert (fields["name"], fields["external_data"], fields["data_location"]) == (8, 13, 14)

    assert T.onnx_external_tensors(tiny_bundle / "model.quant.onnx") == []
    b = _copy(tiny_bundle, tmp_path / "b")
    name = _external_data_model(b)
    assert T.onnx_external_tensors(b / "model.quant.onnx") == [name]

    # In a subgraph (an If branch's initializer) too.
    inner = onnx.helper.make_tensor("deep", onnx.TensorProto.FLOAT, [1], [1.0])
    inner.data_location = onnx.TensorProto.EXTERNAL
    branch = onnx.helper.make_graph([], "then", [], [onnx.helper.make_tensor_value_info("deep", 1, [1])],
                                    initializer=[inner])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [1])])
    (tmp_path / "if.onnx").write_bytes(onnx.helper.make_model(graph).SerializeToString())
    assert T.onnx_external_tensors(tmp_path / "if.onnx") == ["deep", "deep"]
    (tmp_path / "junk.onnx").write_bytes(b"\x3a\xff\xff\xff\xff\x0f")
    with pytest.raises(BundleError, match="junk.onnx: not a valid ONNX protobuf"):
        T.onnx_external_tensors(tmp_path / "junk.onnx")


# ------------------------------------------------------------------------------------------ unpack


def _tar(path: Path, bundle: Path, *extra: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name, filter=lambda t: None if "__pycache__" in t.name else t)
        for info in extra:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _entry(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, 1 if kind == tarfile.REGTYPE else 0
    return info


def test_unpack_verifies_then_moves_into_place(signed, keypair, tmp_path, capsys):
    from edgepack.bundle_files import archive

    arc = archive(signed)
    dest = tmp_path / "device" / "tiny"
    assert shim_main(["unpack", str(arc), str(dest), "--keys", str(keypair[1])]) == 0
    assert "signed by key" in capsys.readouterr().out
    assert OnnxPipeline(dest, trusted_keys=keypair[1])(QUERY)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    refused(["unpack", str(arc), str(dest), "--keys", str(keypair[1])], capsys, "already exists", "--replace")
    assert shim_main(["unpack", str(arc), str(dest), "--keys", str(keypair[1]), "--replace"]) == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # no temporary directory left

    # Without keys: checksums, and it says the signature was not checked.
    assert shim_main(["unpack", str(arc), str(tmp_path / "plain")]) == 0
    assert "signature not checked" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink", "tampered", "unsigned"])
@pytest.mark.parametrize("data_filter", [True, False], ids=["data_filter", "no_data_filter"])
def test_unpack_refuses(case, data_filter, signed, keypair, tmp_path, capsys, monkeypatch):
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    extra, needles = {
        "dotdot": ([_entry("tiny/../../escaped.txt")], ["'tiny/../../escaped.txt'", "outside the destination"]),
        "absolute": ([_entry(str(tmp_path / "escaped.txt"))], ["escaped.txt", "outside the destination"]),
        "symlink": ([_entry("tiny/passwd", tarfile.SYMTYPE, "/etc/passwd")], ["'tiny/passwd'", "symbolic link"]),
        "hardlink": ([_entry("tiny/passwd", tarfile.LNKTYPE, "/etc/passwd")], ["'tiny/passwd'", "hard link"]),
        "tampered": ([], ["manifest.json", "does not match its signature"]),
        "unsigned": ([], ["manifest.sig", "unsigned"]),
    }[case]
    if case == "tampered":
        _bump_a_bias(signed)
        update_manifest(signed)
    if case == "unsigned":
        (signed / "manifest.sig").unlink()
    arc = _tar(tmp_path / "tiny.tar.gz", signed, *extra)
    dest = tmp_path / "device" / "tiny"
    refused(["unpack", str(arc), str(dest), "--keys", str(keypair[1])], capsys, *needles)
    assert not dest.exists() and not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not list((tmp_path / "device").iterdir())  # the temporary extraction is gone


# --------------------------------------------------------------------------------- subprocesses


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", T.KEYS_ENV)}
    return {**env, "PYTHONPATH": str(SHIM_PARENT), **extra}


def test_cli_in_a_subprocess(signed, keypair, tmp_path):
    run = [sys.executable, "-m", "runtime_shim", "verify", str(signed), "--keys", str(keypair[1])]
    ok = subprocess.run(run, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and "signed by key" in ok.stdout and "own shim" not in ok.stdout, ok.stderr
    (signed / "extra.txt").write_text("x")
    bad = subprocess.run(run, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "extra.txt" in bad.stderr


def test_bundles_own_shim_cannot_vouch_for_its_bundle(signed, keypair):
    """Run from inside the bundle, ``python -m runtime_shim`` is the bundle's own code, which ran before any
    check: with keys it refuses to vouch for the bundle (one line naming the installed runtime)."""
    run = [sys.executable, "-m", "runtime_shim", "verify", ".", "--keys", str(keypair[1])]
    env = {k: v for k, v in _env().items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}  # as on a device
    proc = subprocess.run(run, capture_output=True, text=True, env=env, cwd=signed, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the bundle's own copy" in lines[0] and "installed runtime" in lines[0]
    # Without keys (checksums only, nothing trusted) it runs as before.
    proc = subprocess.run(run[:-2], capture_output=True, text=True, env=env, cwd=signed, timeout=120)
    assert proc.returncode == 0 and "signature not checked" in proc.stdout, proc.stderr


_BLOCK_CRYPTOGRAPHY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cryptography":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def test_shim_runs_without_cryptography(unsigned, signed, keypair):
    code = _BLOCK_CRYPTOGRAPHY + (
        "import json\n"
        "from runtime_shim import OnnxPipeline\n"
        "from runtime_shim.__main__ import main\n"
        f"answer = OnnxPipeline({str(unsigned)!r})({QUERY!r})\n"
        f"assert main(['verify', {str(unsigned)!r}]) == 0\n"
        f"signed_rc = main(['verify', {str(signed)!r}, '--keys', {str(keypair[1])!r}])\n"
        "print(json.dumps({'label': answer[0]['label'], 'signed_rc': signed_rc,\n"
        "                  'loaded': sorted(m for m in sys.modules if m.startswith('cryptography'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["label"]
    assert report["signed_rc"] == 2  # a signed bundle with keys configured needs cryptography, and says so
    assert "pip install 'cryptography>=42'" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ docs


def test_trust_doc_commands_parse():
    text = (ROOT / "docs" / "TRUST.md").read_text()
    lines = [ln.split(" #", 1)[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for ln in block.replace("\\\n", " ").splitlines()]
    seen = 0
    for line in filter(None, lines):
        for part in line.split("&&"):
            words = shlex.split(part.strip())
            while words and re.match(r"[A-Z_]+=", words[0]):  # VAR=value before the command
                words.pop(0)
            if words[:1] == ["edgepack"]:
                parser, argv = __import__("edgepack.cli", fromlist=["make_parser"]).make_parser(), words[1:]
            elif words[:3] == ["python", "-m", "runtime_shim"]:
                parser, argv = __import__("runtime_shim.__main__", fromlist=["make_parser"]).make_parser(), words[3:]
            else:
                continue
            parser.parse_args(argv)
            seen += 1
    assert seen >= 5
    table = next(ln for ln in text.splitlines() if ln.startswith("| Threat"))
    assert all(h in table for h in ("Checksums stop it", "Signatures", "Neither stops it"))


# ------------------------------------------------------------------------- the device (slow)

# device_python: the session's runtime-only venv (conftest.py), cryptography included.


@pytest.mark.slow
def test_signed_bundle_verifies_in_a_runtime_only_venv(device_python, signed, keypair, tmp_path):
    from edgepack.bundle_files import archive

    shim = tmp_path / "opt" / "shim"  # "installed from a trusted place": outside the bundle, run from elsewhere
    shutil.copytree(SHIM_PARENT / "runtime_shim", shim / "runtime_shim", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in _env(PYTHONPATH=str(shim)).items() if k != "VIRTUAL_ENV"}
    env["EDGEPACK_STATE"] = str(tmp_path / "device-state.json")

    def run(*args: str, cwd: Path = tmp_path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(device_python), *args], capture_output=True, text=True, cwd=cwd,
                              env={**env, **extra}, timeout=300)

    code = ("import importlib.util as u, json; print(json.dumps([m for m in ('torch', 'transformers', 'onnx', "
            "'edgepack') if u.find_spec(m)]))")
    assert json.loads(run("-c", code).stdout) == []

    ok = run("-m", "runtime_shim", "verify", str(signed), "--keys", str(keypair[1]))
    assert ok.returncode == 0 and "signed by key" in ok.stdout and "tiny version 100" in ok.stdout, ok.stderr
    pred = run("-m", "runtime_shim", "predict", str(signed), QUERY, "--json", EDGEPACK_TRUSTED_KEYS=str(keypair[1]))
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)[0]["label"] == OnnxPipeline(signed, verify=False)(QUERY)[0]["label"]

    dest = tmp_path / "bundles" / "tiny"
    unpacked = run("-m", "runtime_shim", "unpack", str(archive(signed)), str(dest), "--keys", str(keypair[1]))
    assert unpacked.returncode == 0 and dest.is_dir(), unpacked.stderr
    own = run("-m", "runtime_shim", "verify", ".", "--keys", str(keypair[1]), cwd=dest, PYTHONPATH="")
    assert own.returncode == 2 and "the bundle's own copy" in own.stderr, own.stderr

    _bump_a_bias(signed)
    assert run("-m", "runtime_shim", "verify", str(signed), "--update").returncode == 0
    bad = run("-m", "runtime_shim", "verify", str(signed), "--keys", str(keypair[1]))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "does not match its signature" in bad.stderr
