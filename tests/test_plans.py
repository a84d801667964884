"""Kernel plans and wisdom (fastbn.plans): call classes, the wisdom file and its key."""
import json

import pytest

from fastbn import machine, plans

BUILDS = {"numba": "numba 0 for test-cpu"}


@pytest.fixture(autouse=True)
def clean_state(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(plans.WISDOM_ENV, raising=False)
    plans.forget()
    yield
    plans.forget()
    plans.set_tuning("off")


def test_call_classes():
    caches = machine.cache_sizes()
    assert plans.layout_class((256, 4096, 1)) == "nd"
    assert plans.layout_class((32, 64, 49)) == "short"
    assert plans.layout_class((32, 64, 3136)) == "rows"
    assert plans.size_class(caches["l2"], caches) == "l2"
    assert plans.size_class(caches["l2"] + 1, caches) in ("llc", "memory")
    assert plans.size_class(10 * caches["l3"] + 16 * caches["l2"], caches) == "memory"
    assert plans.call_class((32, 64, 3136), "float32", "backward", 4).startswith("rows/")
    with pytest.raises(ValueError, match="pass"):
        plans.call_class((1, 2, 3), "float32", "sideways", 4)


def test_default_wisdom_path_is_in_the_users_cache(tmp_path):
    assert plans.wisdom_path() == str(tmp_path / "cache" / "fastbn" / "wisdom.json")


def test_saved_wisdom_is_used_on_the_same_machine():
    key = "rows/memory/float32/backward"
    path = plans.save(BUILDS, {"numba": {key: {"fuse": False}}})
    plans.load(BUILDS)
    state = plans.status()
    assert state["in_use"] and state["file"] == path and "wisdom from" in state["reason"]
    assert state["classes"] == {"numba": 1}
    assert plans.stored_plan("numba", key) == {"fuse": False}
    assert plans.stored_plan("numba", "nd/l2/float32/forward") is None
    # a second save merges
    plans.save(BUILDS, {"numba": {"nd/l2/float32/forward": {"fuse": True}}})
    plans.load(BUILDS)
    assert plans.status()["classes"] == {"numba": 2}


def test_wisdom_of_another_machine_or_build_is_ignored_and_says_why():
    key = "rows/memory/float32/backward"
    path = plans.save(BUILDS, {"numba": {key: {"fuse": False}}})
    plans.load({"numba": "another build"})
    state = plans.status()
    assert not state["in_use"] and "builds" in state["reason"]
    assert plans.stored_plan("numba", key) is None
    with open(path) as file:
        stored = json.load(file)
    stored["key"]["processor"] = "some other processor"
    with open(path, "w") as file:
        json.dump(stored, file)
    plans.load(BUILDS)
    assert not plans.status()["in_use"] and "processor" in plans.status()["reason"]


def test_wisdom_off_and_a_missing_or_broken_file(monkeypatch, tmp_path):
    plans.save(BUILDS, {"numba": {"nd/l2/float32/eval": {"fuse": True}}})
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    plans.load(BUILDS)
    assert plans.wisdom_path() is None
    assert not plans.status()["in_use"] and "off" in plans.status()["reason"]
    with pytest.raises(ValueError, match="off"):
        plans.save(BUILDS, {})
    other = tmp_path / "elsewhere.json"
    monkeypatch.setenv(plans.WISDOM_ENV, str(other))
    plans.load(BUILDS)
    assert "no wisdom file" in plans.status()["reason"]
    other.write_text("{not json")
    plans.load(BUILDS)
    assert "unreadable" in plans.status()["reason"]


def test_forced_plans_come_first_and_are_undone():
    key = "short/l2/float64/forward"
    plans.remember("numba", key, {"fuse": True})
    with plans.forced("numba", key, {"fuse": False}):
        assert plans.stored_plan("numba", key) == {"fuse": False}
    assert plans.stored_plan("numba", key) == {"fuse": True}


def test_tuning_modes():
    assert plans.tuning_mode() == "off"
    plans.set_tuning("measure")
    assert plans.tuning_mode() == "measure"
    with pytest.raises(ValueError, match="tuning mode"):
        plans.set_tuning("sometimes")
