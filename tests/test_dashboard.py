"""``fastbn dashboard``: asv results stored and published, the offline page drawn in Chromium.

One module-scoped run of the command that benchmarks/README.md documents,

    fastbn dashboard --quick --offline --no-serve --profile tiny --bench track_ \
        --html-dir DIR/html --results-dir DIR/results

(``--profile tiny``: the benchmarks on one tiny shape, float32) into a temporary
folder, with ``HOME`` there too so that the asv machine file is a new one,
serves the tests that need a published site. The browser tests open the published
site, served on 127.0.0.1, in headless Chromium (Debian's ``chromium``), driven
by the repository's tooling ``tools/dashboard_browser.py`` (not part of the
installed package), and keep the screenshots in ``FASTBN_TEST_ARTIFACTS`` (default: pytest's
temporary folder).

Without asv, npm (and no cached npm packages) or Chromium these tests skip,
unless ``FASTBN_REQUIRE_DASHBOARD=1`` (set by ``.ci/run``), where they fail.
"""
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fastbn import dashboard

# An asv run (8-55 s on a shared 2-core machine); runs once in .ci/run, not again in its
# "not slow" pass.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("FASTBN_REQUIRE_DASHBOARD") == "1"
DASHBOARD_ARGS = ["--quick", "--offline", "--no-serve", "--profile", "tiny", "--bench", "track_"]
SPEEDUP = dashboard.SPEEDUP_BENCHMARK
FORWARD_FRACTION, BACKWARD_FRACTION = dashboard.COPY_LIMIT_BENCHMARKS
BROWSER_TOOL = ROOT / "tools" / "dashboard_browser.py"
# Files whose npm copy is byte for byte the CDN's (asv's integrity hash matches).
SAME_BYTES = {"jquery", "flot-orderbars", "blueimp-md5", "bootstrap"}


def unavailable(reason):
    """Skip, or fail where the dashboard tests are required (CI)."""
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def command_env(home):
    env = dict(os.environ)
    env["HOME"] = str(home)
    # The npm tarballs stay in the user's cache (HOME is a temporary one here).
    env["FASTBN_NPM_CACHE"] = str(dashboard.npm_cache_dir())
    return env


def run_dashboard(argv, env, cwd):
    """``python -m fastbn dashboard ARGV`` (outside the source tree: the installed fastbn)."""
    return subprocess.run([sys.executable, "-m", "fastbn", "dashboard", *argv,
                           "--config", str(ROOT / "asv.conf.json")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def packages_available():
    cache = dashboard.npm_cache_dir()
    cached = all(dashboard.check_tarball(dashboard.tarball_path(cache, name, version),
                                         name, version)
                 for name, version in dashboard.vendor_packages())
    return cached or shutil.which("npm") is not None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    try:
        import asv  # noqa: F401
    except ImportError:
        unavailable("asv is not installed")
    if not (ROOT / ".git").exists():
        unavailable("not a git clone")
    if not packages_available():
        unavailable("npm is not installed and the npm packages are not cached")
    tmp = tmp_path_factory.mktemp("dashboard")
    (tmp / "home").mkdir()
    html_dir, results_dir = tmp / "html", tmp / "results"
    result = run_dashboard(DASHBOARD_ARGS + ["--html-dir", str(html_dir),
                                             "--results-dir", str(results_dir)],
                           command_env(tmp / "home"), cwd=tmp)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    found = re.search(r"results of commit ([0-9a-f]{40}) stored in (.+)", output)
    assert found, output[-6000:]
    return {"html": html_dir, "results": results_dir, "commit": found.group(1),
            "stored": pathlib.Path(found.group(2).strip()), "output": output,
            "home": tmp / "home"}


def graph_values(html_dir, benchmark, commit):
    """``{(backend, shape, dtype): value}`` of ``commit`` in the published graphs."""
    index = json.loads((html_dir / "index.json").read_text())
    revisions = [int(rev) for rev, full in index["revision_to_hash"].items() if full == commit]
    assert revisions, f"{commit[:8]} is not in the published index"
    params = [[json.loads(value.replace("'", '"')) for value in values]
              for values in index["benchmarks"][benchmark]["params"]]
    files = [path for path in (html_dir / "graphs").rglob(f"{benchmark}.json")
             if "summary" not in path.parts]
    assert len(files) == 1, files
    points = dict((revision, values) for revision, values in json.loads(files[0].read_text()))
    values = points[revisions[0]]
    combos = list(itertools.product(*params))
    assert len(values) == len(combos)
    return dict(zip(combos, values)), index["benchmarks"][benchmark]["unit"]


def test_results_stored_for_the_commit(site):
    machine_files = list(site["results"].glob("*/machine.json"))
    assert len(machine_files) == 1, "the machine is recorded with the results"
    machine = json.loads(machine_files[0].read_text())
    assert machine["machine"] == machine_files[0].parent.name
    assert (site["home"] / ".asv-machine.json").is_file()
    stored = dashboard.stored_results(site["results"], machine["machine"], site["commit"])
    assert stored == [site["stored"]]
    data = json.loads(stored[0].read_text())
    assert data["commit_hash"] == site["commit"]
    assert data["params"]["machine"] == machine["machine"]
    assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", site["commit"]]).returncode == 0
    for name in (SPEEDUP, FORWARD_FRACTION, BACKWARD_FRACTION):
        assert name in data["results"]


@pytest.mark.parametrize("name", [SPEEDUP, FORWARD_FRACTION, BACKWARD_FRACTION])
def test_published_series_are_finite(site, name):
    values, unit = graph_values(site["html"], name, site["commit"])
    assert unit == ("x" if name == SPEEDUP else "fraction")
    backends = {backend for backend, _, _ in values}
    assert {"numpy", "torch"} <= backends
    for (backend, shape, dtype), value in values.items():
        assert (shape, dtype) == ("4x8x4x4", "float32")
        if backend == "numpy":
            assert value is not None, (backend, shape, dtype)
        if backend == "torch" and name == SPEEDUP:
            assert value is None, "PyTorch has no staged backward: no speedup"
        elif backend == "torch":
            assert value is not None, "PyTorch is a peer in the copy-limit graphs"
        if value is not None:
            assert math.isfinite(value) and value > 0, (backend, shape, dtype, value)


def test_offline_page_links_are_local(site):
    html = (site["html"] / "index.html").read_text()
    assert not dashboard.EXTERNAL_TAG.findall(html)
    manifest = json.loads((site["html"] / "vendor" / "manifest.json").read_text())
    assert [row["url"] for row in manifest] == [url for url, *_ in dashboard.VENDOR_FILES]
    for row in manifest:
        path = site["html"] / row["path"]
        assert path.is_file() and path.stat().st_size > 0
        assert f'"{row["path"]}"' in html
        assert row["integrity_kept"] == (row["package"] in SAME_BYTES), row
        if row["integrity_kept"]:
            # The same file as the CDN's: asv's integrity hash still guards it.
            assert f'src="{row["path"]}" integrity=' in html or \
                f'href="{row["path"]}" integrity=' in html
    # The stylesheet's fonts came along.
    assert list((site["html"] / "vendor" / "bootstrap@3.1.1" / "dist" / "fonts").glob("*.woff"))
    # The bar-graph fix is loaded right after flot-orderbars, once.
    orderbars = html.index("/jquery.flot.orderBars.js")
    fix = html.index(f'<script src="{dashboard.ORDERBARS_FIX}"></script>')
    assert orderbars < fix and html.count(dashboard.ORDERBARS_FIX) == 1
    assert html[orderbars:fix].count("<script") == 0
    assert (site["html"] / dashboard.ORDERBARS_FIX).read_text() == dashboard.ORDERBARS_FIX_JS
    assert dashboard.fix_category_bars(site["html"]) == ["index.html"]
    assert (site["html"] / "index.html").read_text() == html, "a second pass changes nothing"


def test_quick_run_arguments():
    """--quick: asv's quick mode in forked children."""
    quick = dashboard.quick_arguments(True, "quick", None)
    assert quick == ["--quick", "--launch-method", "forkserver"]
    assert dashboard.quick_arguments(True, "tiny", "track_") == quick + ["--bench", "track_"]
    assert dashboard.quick_arguments(False, None, None) == []


def test_vendor_table_matches_the_installed_asv():
    """Every CDN file of asv's page has a local copy of the same release."""
    asv = pytest.importorskip("asv")
    page = pathlib.Path(asv.__file__).parent / "www" / "index.html"
    urls = dashboard.EXTERNAL_TAG.findall(page.read_text(encoding="utf-8"))
    assert sorted(urls) == sorted(url for url, *_ in dashboard.VENDOR_FILES)
    for url, package, version, _ in dashboard.VENDOR_FILES:
        if package == "stupid-table-plugin":
            # 1.0.1 was never published to npm; 1.1.3 is its only npm release.
            assert "/stupidtable/1.0.1/" in url and version == "1.1.3"
        else:
            assert version in url, (url, version)


def test_missing_package_is_named(tmp_path, monkeypatch):
    """No npm and an incomplete cache: the error names exactly what is missing."""
    monkeypatch.setenv("FASTBN_NPM", str(tmp_path / "no-npm"))
    with pytest.raises(dashboard.MissingPackageError) as info:
        dashboard.fetch_packages(tmp_path / "empty")
    assert info.value.packages == [f"{name}@{version}"
                                   for name, version in dashboard.vendor_packages()]
    assert "jquery@3.3.1" in str(info.value) and "npm is not installed" in str(info.value)

    cache = dashboard.npm_cache_dir()
    partial = tmp_path / "partial"
    partial.mkdir()
    for name, version in dashboard.vendor_packages():
        source = dashboard.tarball_path(cache, name, version)
        if name != "bootstrap" and source.is_file():
            shutil.copy(source, partial)
    (partial / "bootstrap-3.1.1.tgz").write_bytes(b"not a tarball")
    if len(list(partial.glob("*.tgz"))) < len(dashboard.vendor_packages()):
        pytest.skip("the npm packages are not cached")
    with pytest.raises(dashboard.MissingPackageError) as info:
        dashboard.fetch_packages(partial)
    assert info.value.packages == ["bootstrap@3.1.1"]


def test_offline_command_fails_clearly_without_packages(tmp_path):
    env = dict(os.environ)
    env["FASTBN_NPM"] = str(tmp_path / "no-npm")
    result = run_dashboard(["--skip-run", "--offline", "--no-serve",
                            "--npm-cache", str(tmp_path / "empty"),
                            "--html-dir", str(tmp_path / "html"),
                            "--results-dir", str(tmp_path / "results")], env, cwd=tmp_path)
    assert result.returncode == 2
    assert "missing npm package(s) jquery@3.3.1, flot@0.8.3" in result.stderr
    assert not (tmp_path / "html").exists(), "nothing is published before the check"


# The browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = os.environ.get("FASTBN_TEST_ARTIFACTS")
    folder = pathlib.Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    """``tools/dashboard_browser.py``, imported by path (it is not in the package)."""
    spec = importlib.util.spec_from_file_location("dashboard_browser", BROWSER_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chromium(browser):
    found = browser.find_chromium()
    if not found:
        unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        unavailable("websocket-client is not installed")
    return found


def series_by_backend(plot):
    """``{backend: number of finite points}`` from the legend labels."""
    found = {}
    for series in plot["series"]:
        backend = [part.split("-", 1)[1] for part in series["label"].split("; ")
                   if part.startswith("backend-")]
        assert backend, series["label"]
        found[backend[0]] = found.get(backend[0], 0) + len(series["points"])
    return found


@pytest.mark.parametrize("name, unit, png", [
    (SPEEDUP, "x", "dashboard-speedup.png"),
    (FORWARD_FRACTION, "fraction", "dashboard-forward-copy-limit.png"),
])
def test_offline_page_draws_in_chromium(site, browser, chromium, artifacts, name, unit, png):
    with browser.serve(site["html"]) as url:
        assert url.startswith("http://127.0.0.1:")
        report = browser.render_page(f"{url}#{name}", artifacts / png, chromium=chromium)
    print(f"screenshot: {artifacts / png}")
    assert browser.page_problems(report) == []
    state = report["state"]
    assert "error.html" not in state["href"]
    assert "failed to load" not in state["text"]
    assert report["failed_requests"] == [] and report["exceptions"] == []
    assert all(request.startswith(url) for request in report["requests"]), report["requests"]
    assert any("/vendor/jquery@3.3.1/" in request for request in report["requests"])
    assert {"time", "selection", "categories", "axisLabels",
            "orderBars"} <= set(state["libraries"]["flot_plugins"])

    plot = state["plot"]
    assert plot["series_pixels"] > 0, "the series are drawn"
    assert plot["y_label"] == unit, "the unit is the y-axis label"
    assert plot["x_label"] == "commits"
    points = series_by_backend(plot)
    assert points["numpy"] == 1, "one commit, one shape, one dtype: one point"
    if name == SPEEDUP:
        assert points.get("torch", 0) == 0
    else:
        assert points["torch"] == 1, "PyTorch is drawn as a peer"
    for series in plot["series"]:
        assert series["non_finite"] == 0
        assert all(y > 0 for _, y in series["points"])
    shot = (artifacts / png).read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000


def test_category_axis_draws_bars_in_chromium(site, browser, chromium, artifacts):
    """x-axis = shape: one bar per backend side by side (flot categories + orderBars).

    Without ``fastbn-orderbars-categories.js`` flot-orderbars puts every bar
    of four series at x = NaN and nothing is drawn.
    """
    png = "dashboard-forward-copy-limit-by-shape.png"
    with browser.serve(site["html"]) as url:
        report = browser.render_page(f"{url}#{FORWARD_FRACTION}?x-axis=shape",
                                     artifacts / png, chromium=chromium)
    print(f"screenshot: {artifacts / png}")
    assert browser.page_problems(report) == []
    plot = report["state"]["plot"]
    assert plot["x_mode"] == "categories" and plot["x_label"] == "shape"
    assert plot["x_ticks"] == ["4x8x4x4"]
    assert plot["y_label"] == "fraction"
    assert set(series_by_backend(plot)) == {"numpy", "numba", "cython", "torch"}
    positions = []
    for series in plot["series"]:
        assert [point[0] for point in series["points"]] == ["4x8x4x4"], series
        assert series["drawn_x"] and None not in series["drawn_x"], series
        assert series["pixels"] > 0, f"{series['label']}: no pixel of its colour"
        positions += series["drawn_x"]
    assert len(set(positions)) == len(positions), "the bars stand side by side"


def test_benchmark_list_sorts_in_chromium(site, browser, chromium, artifacts):
    """asv's benchmark list sorted by value, descending, by the substitute stupidtable.

    asv names stupidtable 1.0.1, never published to npm; the offline site
    carries stupid-table-plugin 1.1.3, whose stupidtable/stupidsort asv calls.
    """
    png = "dashboard-benchmark-list.png"
    with browser.serve(site["html"]) as url:
        report = browser.render_page(f"{url}#summarylist?sort=1&dir=desc",
                                     artifacts / png, chromium=chromium)
    assert report["failed_requests"] == [] and report["exceptions"] == []
    assert report["console_errors"] == []
    assert report["state"]["libraries"]["stupidtable"]
    table = report["state"]["sorted_table"]
    assert table and table["column"] == "Value" and table["direction"] == "desc"
    values = table["values"]
    assert len(values) >= 3 and None not in values
    assert values == sorted(values, reverse=True)


def test_screenshot_command(site, browser, chromium, artifacts, capsys):
    """The documentation's picture: the tool's command line on a published site."""
    png = artifacts / "dashboard-readme.png"
    page = f"{SPEEDUP}?x-axis=backend&y-axis-scale=log"
    assert browser.main([str(site["html"]), str(png), "--page", page]) == 0
    assert f"saved to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = artifacts / "dashboard-no-such-page.png"
    assert browser.main([str(site["html"]), str(missing), "--page", "no-such-benchmark",
                         "--timeout", "5"]) == 1
    assert "the page did not render" in capsys.readouterr().err


def test_package_leaves_the_browser_out():
    """The installed package carries no browser driver: importing it loads no websocket or server."""
    code = ("import sys, fastbn, fastbn.dashboard, fastbn.__main__; "
            "print(sorted(name for name in sys.modules "
            "if name.split('.')[0] in ('websocket', 'http')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
    assert not hasattr(dashboard, "render_page")
