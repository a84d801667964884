"""fastbn.machine: the cache-size probe on fake sysfs trees, its fallback, and
the processor description; the backends' constants follow it."""
import os

import pytest

import fastbn
from fastbn import machine


def _cache_tree(root, caches):
    """A fake ``cpu0/cache`` folder: one ``indexN`` per (level, type, size)."""
    for number, (level, kind, size) in enumerate(caches):
        folder = root / f"index{number}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return str(root)


def test_cache_sizes_from_sysfs(tmp_path):
    # an AMD EPYC (Zen 3) core: 32K L1d, 512K L2, 32M L3
    root = _cache_tree(tmp_path, [(1, "Data", "32K"), (1, "Instruction", "32K"),
                                  (2, "Unified", "512K"), (3, "Unified", "32768K")])
    sizes = machine.cache_sizes(root)
    assert sizes == {"l1d": 32 * 1024, "l2": 512 * 1024, "l3": 32 * 2**20, "source": "sysfs"}


def test_cache_sizes_instruction_cache_ignored_and_units(tmp_path):
    root = _cache_tree(tmp_path, [(1, "Instruction", "64K"), (1, "Data", "48K"),
                                  (2, "Unified", "2M"), (3, "Unified", "1G")])
    sizes = machine.cache_sizes(root)
    assert (sizes["l1d"], sizes["l2"], sizes["l3"]) == (48 * 1024, 2 * 2**20, 2**30)


def test_cache_sizes_without_l3_report_l2_as_last_level(tmp_path):
    root = _cache_tree(tmp_path, [(1, "Data", "64K"), (2, "Unified", "4096K")])
    sizes = machine.cache_sizes(root)
    assert sizes == {"l1d": 64 * 1024, "l2": 4 * 2**20, "l3": 4 * 2**20, "source": "sysfs"}


def test_cache_sizes_fallback_when_missing(tmp_path):
    sizes = machine.cache_sizes(str(tmp_path / "no-such-folder"))
    assert sizes == {**machine.FALLBACK_CACHES, "source": "fallback"}


def test_cache_sizes_fallback_fills_unreadable_entries(tmp_path):
    root = _cache_tree(tmp_path, [(1, "Data", "32K"), (2, "Unified", "garbage")])
    sizes = machine.cache_sizes(root)
    assert sizes["l1d"] == 32 * 1024
    assert sizes["l2"] == machine.FALLBACK_CACHES["l2"]
    assert sizes["source"] == "fallback"


def test_cpu_model_and_flags_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                       "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n\n"
                       "processor\t: 1\nmodel name\t: other\n")
    assert machine.cpu_model(str(cpuinfo)) == "AMD EPYC 7B13"
    assert machine.cpu_flags(str(cpuinfo)) == {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}


def test_describe_names_this_processor():
    facts = machine.describe()
    assert facts["processor"] and facts["cores"] >= 1
    assert set(facts["caches"]) == {"l1d", "l2", "l3", "source"}
    assert set(facts["features"]) <= set(machine.KERNEL_FEATURES)
    assert facts["processor"] in machine.summary()


def test_backend_constants_follow_the_caches():
    info = fastbn.backend_info()
    caches = machine.cache_sizes()
    if info["numba"]["available"]:
        tuning = info["numba"]["tuning"]
        assert tuning["caches"] == caches
        assert tuning["fused_slab_bytes"] == caches["l2"] // 4
        assert tuning["fused_min_bytes"] == min(caches["l3"], 16 * caches["l2"])
        assert tuning["sum_block"] == 16 * tuning["vector_bytes"]
    if info["cython"]["available"]:
        tuning = info["cython"]["tuning"]
        assert tuning["row_fuse_bytes"] == caches["l2"] // 2
        assert tuning["vector_bytes"] in (16, 32, 64)


V3_FLAGS = ("sse2 cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm "
            "movbe xsave").split()
V4_FLAGS = V3_FLAGS + "avx512f avx512bw avx512cd avx512dq avx512vl".split()


@pytest.mark.parametrize("flags, levels", [
    (["sse2"], ["baseline"]),
    (V3_FLAGS, ["baseline", "v3"]),
    (V4_FLAGS, ["baseline", "v3", "v4"]),
    # AVX-512 without a full v3 (no movbe) is not v4: levels build on each other
    ([f for f in V4_FLAGS if f != "movbe"], ["baseline"]),
])
def test_cpu_levels_from_flags(flags, levels):
    assert machine.cpu_levels(flags, "x86_64") == levels
    assert machine.cpu_levels(flags, "AMD64") == levels


def test_cpu_levels_elsewhere():
    assert machine.cpu_levels(["asimd"], "aarch64") == ["baseline"]
    assert machine.cpu_levels([], "riscv64") == []


def test_missing_flags_name_what_a_level_needs():
    assert machine.missing_flags("v3", V3_FLAGS, "x86_64") == []
    assert machine.missing_flags("v4", V3_FLAGS, "x86_64") == [
        "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
    assert "movbe" in machine.missing_flags("v4", [f for f in V4_FLAGS if f != "movbe"],
                                            "x86_64")
    with pytest.raises(ValueError, match="unknown CPU level"):
        machine.missing_flags("v9", V4_FLAGS, "x86_64")
