"""The torch extras give lower bounds only, the tested pins live in
.ci/constraints.txt, and installing ``fastbn[torch]`` keeps the torch that is
already installed (a newer one included)."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTORCH_PACKAGES = ("torch", "torchvision")


def _requirements():
    with open(ROOT / "pyproject.toml", "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
            yield extra, name.lower(), requirement


def test_the_extras_never_cap_torch():
    found = set()
    for extra, name, requirement in _requirements():
        if name in PYTORCH_PACKAGES:
            found.add(name)
            specifiers = requirement[len(name):].replace(" ", "")
            assert all(part.startswith(">=") for part in specifiers.split(",") if part), \
                f"[{extra}] {requirement}: only lower bounds"
    assert found == set(PYTORCH_PACKAGES)


def test_the_constraints_pin_the_tested_releases():
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    assert set(PYTORCH_PACKAGES) <= set(pins)
    assert all(re.fullmatch(r"\d+(\.\d+)+", pins[name]) for name in PYTORCH_PACKAGES)


@pytest.mark.slow   # pip builds fastbn's metadata (meson) in an isolated environment
def test_installing_the_torch_extra_keeps_the_installed_torch(tmp_path):
    """``pip install --dry-run --report`` of ``.[torch]`` into this environment:
    pip would install nothing named torch, whatever its version here."""
    torch = pytest.importorskip("torch")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
         "--report", str(report), f"{ROOT}[torch]"],
        capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0 and not report.exists():
        pytest.fail(f"pip's dry run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, (
        f"installing fastbn[torch] would replace torch {torch.__version__} "
        f"with {planned.get('torch')}")
    assert "fastbn" in planned
