"""`fastbn bench --suite torch-model` in its tiny profile: it runs, and its
report holds the per-call table and the three versions of the model with
their figures."""
import pytest

from fastbn import machine
from fastbn.__main__ import main
from fastbn.bench import report

torch = pytest.importorskip("torch")


def test_torch_model_suite_tiny(tmp_path, capsys):
    from fastbn.bench.suites.torch_model import import_torchvision
    try:
        import_torchvision()
    except ImportError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "torch_models.md"
    status = main(["bench", "--suite", "torch-model", "--profile", "tiny", "--no-progress",
                   "--backends", "numpy", "--threads", "1", "--report", str(path)])
    capsys.readouterr()
    assert status == 0
    text = path.read_text()
    assert "Made by `fastbn bench --suite torch-model --profile tiny" in text
    assert machine.summary() in text
    rows = report.parse_tables(text)["Training step and evaluation forward"]
    assert [row["batch norm"] for row in rows] == ["torch", "fastbn", "fastbn+relu"]
    for row in rows:
        assert float(row["train ms median (best)"].split()[0]) > 0
        assert float(row["BN ms in step"]) > 0
    calls = report.parse_tables(text)["One call on (2, 8, 4, 4) float32 (us)"]
    assert [row["case"] for row in calls] == ["training forward", "evaluation forward",
                                              "forward + backward"]
    for row in calls:
        assert float(row["torch.nn.functional.batch_norm"]) > 0
        assert float(row["fastbn.torch.batch_norm"]) > 0
    assert "9 of them fused" in text   # ResNet-18: the stem's and each block's first


def test_per_call_table_is_timed_without_a_passive_wait_policy(monkeypatch):
    """Under OMP_WAIT_POLICY=passive PyTorch wakes its sleeping threads on
    every tiny call; the per-call table is then timed in a child process
    without that policy, and says so."""
    from fastbn.bench.suites import torch_model

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    got = report.Report("per call", "test")
    torch_model._per_call("numpy", 1, 1, got)
    got.finish()
    text = got.to_markdown()
    assert "in a child process without OMP_WAIT_POLICY" in text
    rows = report.parse_tables(text)["One call on (2, 8, 4, 4) float32 (us)"]
    assert [row["case"] for row in rows] == list(torch_model.PER_CALL_CASES)
    assert all(float(row["fastbn.torch.batch_norm"]) > 0 for row in rows)
