"""The memory guard reads the container's memory cgroup (fake cgroup trees).

A fake tree is a ``/proc/self/cgroup`` file and the cgroup files it points
to, written under ``tmp_path``.
"""
import numpy as np
import pytest

import fastbn
from fastbn.backends import _memory

from conftest import backend_params

MiB = 2**20
V1_UNLIMITED = 9223372036854771712


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(tmp_path, groups, path="/user.slice/job"):
    """cgroup v2: ``groups`` maps a group path to (memory.max, memory.current, inactive_file)."""
    write(tmp_path / "self_cgroup", f"0::{path}\n")
    for group, (limit, current, inactive) in groups.items():
        directory = tmp_path / "cg" / group.strip("/")
        write(directory / "memory.max", f"{limit}\n")
        write(directory / "memory.current", f"{current}\n")
        write(directory / "memory.stat", f"anon 1\ninactive_file {inactive}\nactive_file 7\n")
    return str(tmp_path / "cg"), str(tmp_path / "self_cgroup")


def v1_tree(tmp_path, groups, path="/docker/abc"):
    """cgroup v1: the memory controller's limit_in_bytes, usage_in_bytes, total_inactive_file."""
    write(tmp_path / "self_cgroup",
          f"12:pids:{path}\n4:memory:{path}\n1:name=systemd:{path}\n0::/\n")
    for group, (limit, usage, inactive) in groups.items():
        directory = tmp_path / "cg" / "memory" / group.strip("/")
        write(directory / "memory.limit_in_bytes", f"{limit}\n")
        write(directory / "memory.usage_in_bytes", f"{usage}\n")
        write(directory / "memory.stat",
              f"cache 5\ninactive_file 3\ntotal_inactive_file {inactive}\n")
    return str(tmp_path / "cg"), str(tmp_path / "self_cgroup")


def test_v2_limit_minus_current_plus_inactive_file(tmp_path):
    root, self_cgroup = v2_tree(tmp_path, {"/user.slice/job": (512 * MiB, 200 * MiB, 50 * MiB)})
    assert _memory.cgroup_available_bytes(root, self_cgroup) == (512 - 150) * MiB


def test_v2_max_is_no_limit(tmp_path):
    root, self_cgroup = v2_tree(tmp_path, {"/user.slice/job": ("max", 200 * MiB, 0)})
    assert _memory.cgroup_available_bytes(root, self_cgroup) is None


def test_v2_an_ancestor_limit_applies(tmp_path):
    root, self_cgroup = v2_tree(tmp_path, {
        "/user.slice/job": ("max", 100 * MiB, 0),
        "/user.slice": (300 * MiB, 250 * MiB, 10 * MiB),
    })
    assert _memory.cgroup_available_bytes(root, self_cgroup) == (300 - 240) * MiB


def test_v2_group_hidden_by_a_namespace_is_read_at_the_root(tmp_path):
    # Inside a cgroup namespace the files of the process's group are the root's.
    root, self_cgroup = v2_tree(tmp_path, {"/": (64 * MiB, 16 * MiB, 0)}, path="/not/here")
    assert _memory.cgroup_available_bytes(root, self_cgroup) == 48 * MiB


def test_v2_usage_above_limit_leaves_nothing(tmp_path):
    root, self_cgroup = v2_tree(tmp_path, {"/user.slice/job": (100 * MiB, 120 * MiB, 0)})
    assert _memory.cgroup_available_bytes(root, self_cgroup) == 0


def test_v1_limit_minus_usage_plus_inactive_file(tmp_path):
    root, self_cgroup = v1_tree(tmp_path, {"/docker/abc": (1024 * MiB, 600 * MiB, 100 * MiB)})
    assert _memory.cgroup_available_bytes(root, self_cgroup) == (1024 - 500) * MiB


def test_v1_unlimited_is_no_limit(tmp_path):
    root, self_cgroup = v1_tree(tmp_path, {"/docker/abc": (V1_UNLIMITED, 600 * MiB, 0),
                                           "/": (V1_UNLIMITED, 900 * MiB, 0)})
    assert _memory.cgroup_available_bytes(root, self_cgroup) is None


def test_no_cgroup_files(tmp_path):
    write(tmp_path / "self_cgroup", "0::/some/group\n")
    assert _memory.cgroup_available_bytes(str(tmp_path / "none"),
                                          str(tmp_path / "self_cgroup")) is None
    assert _memory.cgroup_available_bytes(str(tmp_path), str(tmp_path / "missing")) is None


def test_available_bytes_is_the_smaller_of_machine_and_cgroup(tmp_path, monkeypatch):
    root, self_cgroup = v2_tree(tmp_path, {"/user.slice/job": (8 * MiB, 2 * MiB, 0)})
    monkeypatch.setattr(_memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(_memory, "SELF_CGROUP", self_cgroup)
    machine = _memory.meminfo_available_bytes()
    assert machine is not None and machine > 6 * MiB
    assert _memory.available_bytes() == 6 * MiB


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "cuda"])
def test_staged_backward_refuses_past_the_cgroup_limit(backend, tmp_path, monkeypatch):
    """A container limit below the machine's free memory: MemoryError before allocating."""
    x = np.random.default_rng(0).standard_normal((64, 16, 32, 32))
    out, cache = fastbn.batchnorm_forward(x, backend=backend)
    # Room for one more array of x's size, not for the staged backward's
    # full-size temporaries.
    root, self_cgroup = v2_tree(tmp_path, {"/user.slice/job": (x.nbytes + MiB, MiB, 0)})
    monkeypatch.setattr(_memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(_memory, "SELF_CGROUP", self_cgroup)
    dx = np.full_like(x, np.nan)
    with pytest.raises(MemoryError, match="staged backward"):
        fastbn.batchnorm_backward(np.ones_like(x), cache, method="staged", out=dx)
    assert np.isnan(dx).all(), "dx was written before the MemoryError"
    # The simplified backward allocates nothing of x's size and still runs.
    fastbn.batchnorm_backward(np.ones_like(x), cache, out=dx)
    assert np.isfinite(dx).all()
