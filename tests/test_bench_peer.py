"""PyTorch's peer process (fastbn.bench.peer): it answers with samples, the suites
that compare with PyTorch never import it, and the page names how PyTorch and
fastbn's plans were timed. No assertion depends on the machine's speed."""
import json
import os
import subprocess
import sys

import pytest

from fastbn.bench import peer, report, timing
from fastbn.bench.suites import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_timings_travel_as_messages():
    got = timing.interleaved({"a": lambda: None}, rounds=2, max_rounds=2, min_seconds=0)
    got["a"].error = "ValueError: x"
    back = timing.Timings.from_message(json.loads(json.dumps(got.to_message())))
    assert back["a"].samples == got["a"].samples and back["a"].error == "ValueError: x"
    assert (back.rounds, back.load_before, back.seconds) == (got.rounds, got.load_before,
                                                             got.seconds)


def test_merged_groups():
    ours = timing.Timings(a=timing.KernelTiming("a"))
    ours.rounds, ours.load_before, ours.load_after, ours.seconds = 5, 0.5, 0.7, 1.0
    theirs = timing.Timings(b=timing.KernelTiming("b"))
    theirs.rounds, theirs.load_before, theirs.load_after, theirs.seconds = 7, None, 0.9, 2.0
    both = timing.merged(ours, theirs)
    assert set(both) == {"a", "b"} and both.rounds == 7 and both.seconds == 3.0
    assert (both.load_before, both.load_after) == (0.5, 0.9)
    with pytest.raises(ValueError, match="timed twice"):
        timing.merged(ours, ours)


class FailedPeer:
    """A peer that cannot run anything (as when its process fails)."""

    threads = threads_used = torch_version = None

    def time(self, shape, kernels, rounds, **options):
        return timing.Timings(), {name: "the PyTorch peer process exited (status 1)"
                                  for name in kernels}


def test_a_failed_peer_leaves_torch_out_with_the_reason():
    got, skipped = default.time_backends(["numpy", "torch"], (4, 3, 2), "float32", 2,
                                         ("forward", "simplified"), 0, peer=FailedPeer())
    assert skipped == {"torch": "the PyTorch peer process exited (status 1)"}
    assert "numpy forward" in got and not any(name.startswith("torch") for name in got)
    rows, _ = default.rows_of(got, ["numpy", "torch"], (4, 3, 2), "float32", skipped)
    assert rows[1][:3] == ["torch", "float32", "(4, 3, 2)"] and rows[1][3] == "n/a"


def test_plan_source_names_wisdom_or_the_default(monkeypatch):
    from fastbn import plans

    monkeypatch.setattr(plans, "status", lambda: {
        "in_use": True, "file": "/x/wisdom.json", "reason": "wisdom from /x/wisdom.json",
        "tuning": "off", "classes": {"numba": 3}})
    assert report.plan_source() == "wisdom from /x/wisdom.json (stored call classes: numba 3)"
    monkeypatch.setattr(plans, "status", lambda: {
        "in_use": False, "file": None, "reason": "FASTBN_WISDOM=off: default plans",
        "tuning": "measure", "classes": {}})
    assert report.plan_source() == "default (FASTBN_WISDOM=off); tuning mode measure"
    page = report.Report("T", "fastbn bench").finish()
    assert "- plans: default (FASTBN_WISDOM=off); tuning mode measure" in page.to_markdown()
    assert json.loads(page.to_json())["plans"].startswith("default")


def test_the_peer_returns_samples_of_the_requested_kernels():
    torch = pytest.importorskip("torch")
    wanted = {"torch forward": {"kind": "forward", "dtype": "float32"},
              "torch simplified": {"kind": "simplified", "dtype": "float64"},
              "copy": {"kind": "copy", "dtype": "float32"},
              "bad": {"kind": "staged", "dtype": "float32"}}
    with peer.Peer(threads=1, fresh=False) as torch_peer:
        got, skipped = torch_peer.time((4, 8, 4, 4), wanted, 2, min_seconds=0, max_rounds=2)
        assert torch_peer.torch_version == torch.__version__
        assert torch_peer.threads_used == 1
        process = torch_peer._process
        again, _ = torch_peer.time((4, 3), {"f": {"kind": "forward", "dtype": "float32"}}, 1,
                                   min_seconds=0, max_rounds=1)
        assert torch_peer._process is process     # the same process served both
    assert set(got) == {"torch forward", "torch simplified", "copy"}
    assert all(len(t.samples) == 2 and t.error is None and t.median > 0
               for t in got.values())
    assert "unknown kind" in skipped["bad"] and len(again["f"].samples) == 1


def test_a_fresh_peer_for_each_request():
    pytest.importorskip("torch")
    torch_peer = peer.Peer(threads=1)
    got, _ = torch_peer.time((4, 3), {"f": {"kind": "forward", "dtype": "float32"}}, 1,
                             min_seconds=0, max_rounds=1)
    assert len(got["f"].samples) == 1 and torch_peer._process is None   # already ended


def test_the_default_suite_times_torch_in_its_peer_only(tmp_path):
    pytest.importorskip("torch")
    page = tmp_path / "page.md"
    script = (
        "import sys\n"
        "from fastbn.__main__ import main\n"
        f"status = main(['bench', '--profile', 'tiny', '--no-progress', '--rounds', '2', "
        f"'--shapes', '4x8x4x4', '--backends', 'numpy,torch', '--report', {str(page)!r}])\n"
        "assert status == 0, status\n"
        "assert 'torch' not in sys.modules, 'torch imported by the timing process'\n")
    env = dict(os.environ, FASTBN_WISDOM="off",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = page.read_text()
    assert f"- PyTorch: {peer.METHOD}, " in text and "(torch " in text
    assert "- plans: default (FASTBN_WISDOM=off)" in text
    rows = report.parse_tables(text)["Times and ratios"]
    assert [r["backend"] for r in rows] == ["numpy", "torch"]
    assert float(rows[1]["fwd ms"]) > 0 and float(rows[0]["fwd vs torch"]) > 0


STEADY_HEAP_SCRIPT = """
import ctypes, resource, sys
import numpy as np
from fastbn.bench import peer
if sys.argv[1] == "steady":
    print(peer.steady_heap(64 << 20), file=sys.stderr)
block = 4 << 20                     # as PyTorch's output at (256, 4096) float32
held = np.ones(block // 8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):                 # a new output each call, the previous one freed
    new = np.empty(block // 8)
    new.fill(1.0)
    held = new
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(peer.glibc() is None, reason="steady_heap sets glibc's malloc")
def test_the_peers_heap_serves_new_outputs_from_touched_pages():
    # 20 new 4 MiB arrays (1024 pages each): each would fault its pages in
    # if the heap gave them back to the system or grew into fresh ones.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", STEADY_HEAP_SCRIPT, "steady"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "never trimmed" in done.stderr
    assert int(done.stdout) < 1024     # less than one array's pages over 20 arrays


def test_a_peer_that_cannot_start_says_why(tmp_path, monkeypatch):
    # An interpreter whose peer greets with an error, as one without PyTorch does.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{\"error\": \"ImportError: no torch\"}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(peer.sys, "executable", str(fake))
    torch_peer = peer.Peer()
    got, skipped = torch_peer.time((4, 3), {"f": {"kind": "forward", "dtype": "float32"}})
    assert not got
    assert skipped == {"f": "the PyTorch peer process cannot start: ImportError: no torch"}
