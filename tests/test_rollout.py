"""``edgepack rollout``'s plan, gate and the inventory's groups. The rollouts themselves run on the fleet
lab's real devices in ``test_fleet.py`` (``test_rollout_*``), which shares its sshd servers."""

from __future__ import annotations

import pytest

from edgepack.errors import EdgepackError
from edgepack.fleet.inventory import Device, load_inventory
from edgepack.fleet.rollout import canary_size, gate, plan_waves


def _devices(n: int, profiles=("pi",)) -> list[Device]:
    return [Device(f"d{i}", profiles[i % len(profiles)], "local") for i in range(n)]


def test_waves_grow_from_the_canary():
    assert [len(w) for w in plan_waves(_devices(20), canary="1", rate=2)] == [1, 2, 4, 8, 5]
    assert [len(w) for w in plan_waves(_devices(20), canary="10%", rate=3)] == [2, 6, 12]
    assert [len(w) for w in plan_waves(_devices(5), canary="2", rate=1)] == [2, 2, 1]
    assert [len(w) for w in plan_waves(_devices(3), canary="100%")] == [3]
    # every kind of device early: the canary of two takes one of each profile
    waves = plan_waves(_devices(6, ("pi", "pi", "pi", "x86")), canary="2")
    assert [d.profile for d in waves[0]] == ["pi", "x86"]
    assert sorted(d.name for w in waves for d in w) == sorted(d.name for d in _devices(6))
    for bad, why in (
        ("0", "--canary '0'"),
        ("x", "--canary 'x'"),
        ("0%", "--canary '0%'"),
        ("101%", "'101%'"),
    ):
        with pytest.raises(EdgepackError, match=why):
            canary_size(bad, 10)
    with pytest.raises(EdgepackError, match="--rate 6: pass a factor from 1"):
        plan_waves(_devices(3), rate=6)


def test_gate_names_the_device_and_the_figure():
    rec = {
        "device": "pi-7",
        "profile": "pi5",
        "status": "budget",
        "regression": {"ok": True},
        "budgets": [
            {"budget": "peak_memory_mb", "ok": False, "line": "peak 310 > 250 MB"},
            {"budget": "p95_latency_ms", "ok": None, "line": "-"},
        ],
    }
    [stop] = gate(rec)
    assert (stop.device, stop.figure) == ("pi-7", "peak_memory_mb") and "peak 310 > 250 MB" in stop.line
    rec.update(
        budgets=[],
        regression={
            "ok": False,
            "device_accuracy": 0.8,
            "build_accuracy": 0.85,
            "drop_points": 5.0,
            "tolerance_points": 1.0,
        },
    )
    assert [s.figure for s in gate(rec)] == ["accuracy"]
    assert (
        gate(
            {
                "device": "x",
                "status": "ok",
                "regression": {"ok": True},
                "budgets": [{"budget": "b", "ok": True}],
            }
        )
        == []
    )


def test_inventory_groups(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(
        '[devices.a]\nhost = "x"\nprofile = "edge-x86-2core"\ngroups = ["kitchen", "pi5"]\n'
        '[devices.b]\nhost = "y"\nprofile = "edge-x86-2core"\ngroups = ["kitchen"]\n'
        '[devices.c]\nhost = "z"\nprofile = "edge-x86-2core"\n'
    )
    inv = load_inventory(path)
    assert [d.name for d in inv.select("kitchen")] == ["a", "b"]
    assert [d.name for d in inv.select("pi5,kitchen,c")] == ["a", "b", "c"]
    with pytest.raises(EdgepackError, match="unknown device garage; .* has: a, b, c; groups: kitchen, pi5"):
        inv.select("garage")
    for body, expected in (
        ('groups = "kitchen"', "groups must be a list"),
        ('groups = ["all"]', "'all' is not a valid"),
        ('groups = ["b"]', "'b' names both a device and a group"),
    ):
        path.write_text(
            f'[devices.a]\nhost = "x"\nprofile = "edge-x86-2core"\n{body}\n'
            '[devices.b]\nhost = "y"\nprofile = "edge-x86-2core"\n'
        )
        with pytest.raises(EdgepackError, match=expected) as err:
            load_inventory(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
