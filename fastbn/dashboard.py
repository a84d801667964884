"""``fastbn dashboard``: run the asv suite, store the results, publish and serve.

The command strings together the asv steps that a dashboard needs, from a
clone of the repository (it reads ``asv.conf.json`` and ``benchmarks/``):

1. ``asv machine --yes`` when the machine is not yet in ``~/.asv-machine.json``;
2. ``asv run RANGE`` in asv's own environments, when ``--commits`` is given;
3. ``asv run --python=same --set-commit-hash HEAD``: the installed fastbn,
   stored under the current commit (without the hash asv stores nothing);
4. ``asv publish`` into ``--html-dir``;
5. with ``--offline``, the scripts and stylesheets that asv's page loads from
   CDNs are copied into the site from npm packages of the same releases
   (``npm pack``, cached outside the repository) and the links rewritten;
6. ``asv preview`` on that directory, unless ``--no-serve``.

After ``asv publish`` a small script is added to the site so that asv's bar
graphs (x axis = backend, shape or dtype) draw; see ``ORDERBARS_FIX``.

``--screenshot PATH`` opens the published page in headless Chromium (the
Chrome DevTools protocol over ``websocket-client``), checks that every
script loaded and the graph was drawn, and saves a PNG.
"""
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request

SPEEDUP_BENCHMARK = "bench_batchnorm.BackwardStaged.track_speedup_simplified_over_staged"
COPY_LIMIT_BENCHMARKS = ("bench_batchnorm.Forward.track_fraction_of_copy_limit",
                         "bench_batchnorm.Backward.track_fraction_of_copy_limit")
PROFILES = ("default", "quick", "tiny", "slow")

# Every script and stylesheet that asv's index.html loads from a CDN, and the
# file of the npm package that holds the same library: (URL, npm package,
# npm version, file inside the package). The npm release of flot 0.8.3 ships
# the unminified sources only, so its files stand for cdnjs' minified ones.
# stupidtable 1.0.1 was never published to npm; its only npm release,
# stupid-table-plugin 1.1.3, has the same two functions that asv calls
# (stupidtable, stupidsort).
VENDOR_FILES = [
    ("https://code.jquery.com/jquery-3.3.1.min.js",
     "jquery", "3.3.1", "dist/jquery.min.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js",
     "flot", "0.8.3", "jquery.flot.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js",
     "flot", "0.8.3", "jquery.flot.time.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js",
     "flot", "0.8.3", "jquery.flot.selection.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js",
     "flot", "0.8.3", "jquery.flot.categories.js"),
    ("https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js",
     "flot-orderbars", "1.0.0", "js/jquery.flot.orderBars.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js",
     "stupid-table-plugin", "1.1.3", "stupidtable.min.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js",
     "blueimp-md5", "2.19.0", "js/md5.min.js"),
    ("https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js",
     "bootstrap", "3.1.1", "dist/js/bootstrap.min.js"),
    ("https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css",
     "bootstrap", "3.1.1", "dist/css/bootstrap.min.css"),
]
VENDOR_DIR = "vendor"

# asv's bar graphs (the sidebar's x-axis set to a parameter: backend, shape,
# dtype) are drawn by flot's categories plugin and flot-orderbars 1.0.0, which
# places the bars of several series side by side. flot-orderbars turns its
# border width from pixels into x units with the span of the series' raw x
# values; on a category axis those are the labels (strings), the span is NaN,
# and so is the x of every bar but the middle one of an odd count: two or
# more series draw no bar, online or offline (the npm file is the CDN's, byte
# for byte). asv 0.5 shipped its own copy of the plugin, patched for
# non-numeric x; asv 0.6 loads the unpatched npm release. This script, loaded
# right after the plugin, wraps the plugin's hook so that the x values it
# reads are the category numbers while it runs. A page without the plugin is
# left alone.
ORDERBARS_FIX = "fastbn-orderbars-categories.js"
ORDERBARS_FIX_JS = r"""/* Written by fastbn dashboard: flot-orderbars on a category x axis.
   The plugin measures the x axis with the raw x values of the series, which
   are category labels there (NaN bar positions); while its hook runs, each
   series' x values are replaced by the category numbers. */
(function ($) {
  var plugin = null;
  $.each($.plot.plugins, function (i, p) {
    if (p.name === "orderBars") { plugin = p; }
  });
  if (!plugin || plugin.categoryFix) { return; }
  plugin.categoryFix = true;
  var init = plugin.init;

  function numericX(plot) {
    var swapped = [];
    $.each(plot.getData(), function (i, series) {
      if (!series.xaxis || series.xaxis.options.mode !== "categories") { return; }
      var categories = series.xaxis.categories || {};
      var numeric = [];
      for (var j = 0; j < series.data.length; j++) {
        var point = series.data[j];
        if (point == null) { numeric.push(point); continue; }
        point = point.slice();
        // A label not numbered yet (a later series): its position.
        point[0] = categories.hasOwnProperty(point[0]) ? categories[point[0]] : j;
        numeric.push(point);
      }
      swapped.push([series, series.data]);
      series.data = numeric;
    });
    return swapped;
  }

  function restore(swapped) {
    $.each(swapped, function (i, pair) {
      var series = pair[0], original = pair[1];
      // The plugin keeps the shifted x in the point's fourth entry.
      for (var j = 0; j < original.length; j++) {
        if (original[j] != null && series.data[j] != null && series.data[j].length > 3) {
          original[j][3] = series.data[j][3];
        }
      }
      series.data = original;
    });
  }

  plugin.init = function (plot) {
    var hooks = plot.hooks.processDatapoints;
    var first = hooks.length;
    init(plot);
    var added = hooks.splice(first, hooks.length - first);
    $.each(added, function (i, hook) {
      hooks.push(function (plot, series, datapoints) {
        var swapped = numericX(plot);
        try {
          return hook(plot, series, datapoints);
        } finally {
          restore(swapped);
        }
      });
    });
  };
})(jQuery);
"""
# The <script> tag of flot-orderbars, from the CDN or a local copy.
ORDERBARS_TAG = re.compile(
    r"<script\b[^>]*\bsrc=\"[^\"]*jquery\.flot\.orderBars(?:\.min)?\.js\"[^>]*>\s*</script>",
    re.IGNORECASE)

# <script src="http..."> and <link href="http..."> tags of a page.
EXTERNAL_TAG = re.compile(
    r"<(?:script|link)\b[^>]*?\b(?:src|href)=\"(https?://[^\"]+)\"[^>]*>", re.IGNORECASE)
# url(...) references of a stylesheet (fonts, images).
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]+?)['\"]?\s*\)")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0"]


class DashboardError(RuntimeError):
    """A step of the dashboard failed; the message says which and why."""


class MissingPackageError(DashboardError):
    """npm packages needed by ``--offline`` are neither cached nor fetchable.

    Attributes
    ----------
    packages : list of str
        ``name@version`` of every missing package.
    """

    def __init__(self, packages, cache, reason):
        self.packages = list(packages)
        names = " ".join(self.packages)
        super().__init__(
            f"offline dashboard: missing npm package(s) {', '.join(self.packages)} "
            f"({reason}). Fetch them where the npm registry is reachable with "
            f"`npm pack {names} --pack-destination DIR` and copy the .tgz files into "
            f"{cache} (or point FASTBN_NPM_CACHE / --npm-cache at DIR).")


# Command line ---------------------------------------------------------------

def add_arguments(parser):
    """Add the ``dashboard`` options to an ``argparse`` parser.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    parser.add_argument("--quick", action="store_true",
                        help="run each benchmark once (asv run --quick) on the small shapes "
                             "of the quick profile, float32 and float64, each in a child "
                             "forked from one process that imported the backends (asv "
                             "--launch-method forkserver)")
    parser.add_argument("--offline", action="store_true",
                        help="serve asv's scripts and stylesheets from local npm packages")
    parser.add_argument("--no-serve", action="store_true",
                        help="publish only; do not start asv preview")
    parser.add_argument("--html-dir", help="where to publish (default: html_dir of asv.conf.json)")
    parser.add_argument("--results-dir",
                        help="where asv stores results (default: results_dir of asv.conf.json)")
    parser.add_argument("--commits", metavar="RANGE",
                        help="also benchmark a git range in asv's own environments, "
                             "e.g. main~5..main")
    parser.add_argument("--bench", metavar="REGEX",
                        help="only the benchmarks matching REGEX (asv run -b)")
    parser.add_argument("--profile", choices=PROFILES,
                        help="FASTBN_BENCH_PROFILE for the run: the default shapes, the "
                             "small ones of --quick (its default), one tiny shape, or the "
                             "large shape as well")
    parser.add_argument("--machine", help="asv machine name (default: this host's name)")
    parser.add_argument("--skip-run", action="store_true",
                        help="publish the results already stored; run nothing")
    parser.add_argument("--npm-cache",
                        help="folder of npm tarballs for --offline (default: FASTBN_NPM_CACHE "
                             "or ~/.cache/fastbn/npm)")
    parser.add_argument("--port", type=int, default=8080, help="asv preview port [8080]")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="open the published speedup graph in headless Chromium, check "
                             "that it was drawn, and save a screenshot")
    parser.add_argument("--screenshot-page", metavar="FRAGMENT", default=SPEEDUP_BENCHMARK,
                        help="the page of --screenshot, as the part of asv's URL after '#' "
                             "(e.g. BENCHMARK?x-axis=backend for bars per backend) "
                             "[the speedup graph]")
    parser.add_argument("--config", help="asv.conf.json (default: found from the current folder)")


def run(args):
    """Run the ``dashboard`` command.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser set up with :func:`add_arguments`.

    Returns
    -------
    int
        0 on success; 1 when an asv step or some benchmarks failed (the
        results that were stored are published all the same); 2 on a usage
        or setup error.
    """
    try:
        return _run(args)
    except DashboardError as exc:
        print(f"fastbn dashboard: error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"fastbn dashboard: error: `{' '.join(map(str, exc.cmd))}` "
              f"exited with status {exc.returncode}", file=sys.stderr)
        return 1


def _run(args):
    config_path = find_config(args.config)
    repo = config_path.parent
    conf = read_config(config_path)
    html_dir = pathlib.Path(args.html_dir or repo / conf["html_dir"]).resolve()
    results_dir = pathlib.Path(args.results_dir or repo / conf["results_dir"]).resolve()
    env = dict(os.environ)
    profile = args.profile or ("quick" if args.quick else None)
    if profile:
        env["FASTBN_BENCH_PROFILE"] = profile
    if args.offline:
        # Fail before the run, not after it, when a package is missing.
        fetch_packages(npm_cache_dir(args.npm_cache))

    status = 0
    commit = git(repo, "rev-parse", "HEAD")
    # asv publish graphs the commits of the configured branches that exist
    # here, and of the current one ("HEAD" when detached).
    branches = [name for name in conf.get("branches") or ["main"]
                if git_ok(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")]
    current = git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    branches += [current] if current not in branches else []
    with tempfile.TemporaryDirectory(prefix="fastbn-asv-") as tmp:
        asv_conf = write_config(config_path, pathlib.Path(tmp) / "asv.conf.json",
                                results_dir=results_dir, html_dir=html_dir,
                                branches=branches)
        common = ["--config", str(asv_conf)]
        if not args.skip_run:
            machine = ensure_machine(args.machine, env, common)
            machine_args = ["--machine", machine]
            selection = quick_arguments(args.quick, profile, args.bench)
            if args.commits:
                print(f"fastbn dashboard: benchmarking {args.commits} in asv's environments",
                      flush=True)
                try:
                    asv(["run", args.commits, "--skip-existing"] + selection + machine_args
                        + common, env)
                except subprocess.CalledProcessError as exc:
                    status = 1
                    print(f"fastbn dashboard: warning: asv run {args.commits} exited with "
                          f"{exc.returncode} (a build or some benchmarks failed)",
                          file=sys.stderr)
            if git(repo, "status", "--porcelain", "--untracked-files=no"):
                print("fastbn dashboard: warning: the working tree has uncommitted changes; "
                      f"its results are stored under {commit[:8]}", file=sys.stderr)
            print(f"fastbn dashboard: benchmarking the installed fastbn as commit "
                  f"{commit[:8]} on machine {machine!r}", flush=True)
            try:
                asv(["run", "--python=same", "--set-commit-hash", commit] + selection
                    + machine_args + common, env)
            except subprocess.CalledProcessError as exc:
                # asv exits with 2 when a benchmark failed; the others are stored.
                status = 1
                print(f"fastbn dashboard: warning: some benchmarks failed (asv run exited with "
                      f"{exc.returncode}); publishing what was stored", file=sys.stderr)
            stored = stored_results(results_dir, machine, commit)
            if not stored:
                raise DashboardError(f"asv stored no results for {commit[:8]} in {results_dir}")
            print(f"fastbn dashboard: results of commit {commit} stored in {stored[0]}")
        asv(["publish", "--no-pull", "--html-dir", str(html_dir)] + common, env)
        fix_category_bars(html_dir)
        if args.offline:
            vendored = make_offline(html_dir, npm_cache_dir(args.npm_cache))
            packages = sorted({f"{row['package']}@{row['version']}" for row in vendored})
            print(f"fastbn dashboard: offline site, local copies of {', '.join(packages)}")
        print(f"fastbn dashboard: published {html_dir}")
        if args.screenshot:
            with serve(html_dir) as url:
                page = f"{url}#{args.screenshot_page}"
                report = render_page(page, args.screenshot)
            problems = page_problems(report)
            if problems:
                raise DashboardError("the page did not render: " + "; ".join(problems))
            print(f"fastbn dashboard: screenshot of {page} saved to {args.screenshot}")
        if not args.no_serve:
            port = free_port(args.port)
            print(f"fastbn dashboard: serving at http://127.0.0.1:{port}/ (Ctrl-C to stop)",
                  flush=True)
            try:
                asv(["preview", "--html-dir", str(html_dir), "--port", str(port)] + common, env)
            except KeyboardInterrupt:
                pass
    return status


# asv ------------------------------------------------------------------------

def quick_arguments(quick, profile, bench):
    """The ``asv run`` options that select what runs, and how.

    Parameters
    ----------
    quick : bool
        ``--quick``: each benchmark once, in children forked from one process
        (``--launch-method forkserver``; ``benchmarks/preload.py`` has imported
        the backends there).
    profile : str or None
        ``FASTBN_BENCH_PROFILE`` of the run.
    bench : str or None
        ``--bench REGEX``.

    Returns
    -------
    list of str
    """
    argv = ["--quick", "--launch-method", "forkserver"] if quick else []
    if bench:
        argv += ["--bench", bench]
    return argv



def find_config(path=None):
    """The asv configuration: ``path``, or ``asv.conf.json`` in a parent folder.

    Raises
    ------
    DashboardError
        When there is none.
    """
    if path:
        found = pathlib.Path(path).resolve()
        if not found.is_file():
            raise DashboardError(f"no asv configuration at {found}")
        return found
    here = pathlib.Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "asv.conf.json").is_file():
            return folder / "asv.conf.json"
    raise DashboardError("asv.conf.json not found: run from a clone of the fastbn "
                         "repository (or pass --config)")


def read_config(path):
    """asv's configuration as a dict (asv allows ``//`` comments, so does this)."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    text = re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE)
    return json.loads(text)


def write_config(config_path, dest, results_dir, html_dir, branches=None):
    """Copy of the configuration with absolute folders, for a run from anywhere.

    Parameters
    ----------
    config_path, dest : pathlib.Path
    results_dir, html_dir : pathlib.Path
    branches : list of str, optional
        Replaces ``branches``: the branches whose commits ``asv publish``
        graphs.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    conf = read_config(config_path)
    root = pathlib.Path(config_path).parent
    for key in ("repo", "benchmark_dir", "env_dir"):
        conf[key] = str((root / conf.get(key, ".")).resolve())
    conf["results_dir"] = str(results_dir)
    conf["html_dir"] = str(html_dir)
    if branches:
        conf["branches"] = list(branches)
    dest.write_text(json.dumps(conf, indent=4), encoding="utf-8")
    return dest


def asv(argv, env):
    """Run ``python -m asv ARGV`` with this Python (``--python=same`` is this one)."""
    try:
        import asv as _asv  # noqa: F401
    except ImportError as exc:
        raise DashboardError("asv is not installed: pip install 'fastbn[bench]'") from exc
    subprocess.run([sys.executable, "-m", "asv"] + list(argv), env=env, check=True)


def git(repo, *argv):
    """Output of a git command in ``repo``, stripped."""
    try:
        result = subprocess.run(["git", "-C", str(repo)] + list(argv), capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DashboardError(f"git {' '.join(argv)} failed in {repo}: the dashboard needs "
                             "a git clone of the repository") from exc
    return result.stdout.strip()


def git_ok(repo, *argv):
    """True when a git command succeeds in ``repo``."""
    return subprocess.run(["git", "-C", str(repo)] + list(argv), capture_output=True,
                          text=True).returncode == 0


def ensure_machine(name, env, asv_args=()):
    """The asv machine name; registers this machine with asv's defaults if new.

    Parameters
    ----------
    name : str or None
        None: asv's default, this host's name.
    env : dict
        Environment of the asv process.
    asv_args : sequence of str
        More arguments of ``asv machine`` (``--config``).

    Returns
    -------
    str
    """
    import platform
    name = name or platform.node()
    machine_file = pathlib.Path(os.path.expanduser("~/.asv-machine.json"))
    known = {}
    if machine_file.is_file():
        known = json.loads(machine_file.read_text(encoding="utf-8"))
    if name not in known:
        print(f"fastbn dashboard: recording machine {name!r} in {machine_file}", flush=True)
        asv(["machine", "--yes", "--machine", name, *asv_args], env)
    return name


def stored_results(results_dir, machine, commit):
    """asv result files of ``commit`` on ``machine``.

    Returns
    -------
    list of pathlib.Path
    """
    folder = pathlib.Path(results_dir) / machine
    found = []
    for path in sorted(folder.glob(f"{commit[:8]}-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("commit_hash") == commit and data.get("results"):
            found.append(path)
    return found


def fix_category_bars(html_dir):
    """Add ``ORDERBARS_FIX_JS`` after flot-orderbars in a published site's pages.

    Without it, asv's bar graphs of two or more series draw no bar (see the
    comment at ``ORDERBARS_FIX``). Running it again changes nothing.

    Parameters
    ----------
    html_dir : path
        The output of ``asv publish``.

    Returns
    -------
    list of str
        The names of the pages that load the fix.
    """
    html_dir = pathlib.Path(html_dir)
    fixed = []
    for page in sorted(html_dir.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        if ORDERBARS_FIX not in text:
            text = ORDERBARS_TAG.sub(
                lambda match: f'{match.group(0)}\n    <script src="{ORDERBARS_FIX}"></script>',
                text)
            page.write_text(text, encoding="utf-8")
        if ORDERBARS_FIX in text:
            fixed.append(page.name)
    if fixed:
        (html_dir / ORDERBARS_FIX).write_text(ORDERBARS_FIX_JS, encoding="utf-8")
    return fixed


# Offline site ---------------------------------------------------------------

def npm_cache_dir(path=None):
    """Folder of the npm tarballs: ``path``, ``FASTBN_NPM_CACHE`` or the user cache."""
    if path:
        return pathlib.Path(path).expanduser().resolve()
    if os.environ.get("FASTBN_NPM_CACHE"):
        return pathlib.Path(os.environ["FASTBN_NPM_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base, "fastbn", "npm").resolve()


def vendor_packages():
    """``(package, version)`` pairs that ``--offline`` needs, in table order."""
    return list(dict.fromkeys((package, version) for _, package, version, _ in VENDOR_FILES))


def tarball_path(cache, package, version):
    """Where ``npm pack package@version`` leaves its tarball."""
    return pathlib.Path(cache) / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def check_tarball(path, package, version):
    """True when ``path`` is the npm tarball of ``package@version``."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            meta = json.load(tar.extractfile("package/package.json"))
    except (OSError, KeyError, tarfile.TarError, ValueError, AttributeError):
        return False
    return meta.get("name") == package and meta.get("version") == version


def fetch_packages(cache):
    """Make sure every npm tarball that ``--offline`` needs is in ``cache``.

    Missing ones are fetched with ``npm pack`` (the ``npm`` executable, or
    ``FASTBN_NPM``).

    Parameters
    ----------
    cache : pathlib.Path

    Returns
    -------
    dict
        ``(package, version)`` -> tarball path.

    Raises
    ------
    MissingPackageError
        Naming every package that is neither cached nor fetchable.
    """
    cache = pathlib.Path(cache)
    tarballs = {}
    missing = []
    for package, version in vendor_packages():
        path = tarball_path(cache, package, version)
        if check_tarball(path, package, version):
            tarballs[package, version] = path
        else:
            missing.append((package, version))
    if not missing:
        return tarballs
    specs = [f"{package}@{version}" for package, version in missing]
    npm = os.environ.get("FASTBN_NPM") or shutil.which("npm")
    if not npm or not shutil.which(npm):
        raise MissingPackageError(specs, cache, "not in the cache, and npm is not installed")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"fastbn dashboard: npm pack {' '.join(specs)} into {cache}", flush=True)
    try:
        result = subprocess.run([npm, "pack", *specs, "--pack-destination", str(cache)],
                                capture_output=True, text=True, timeout=600)
        reason = (result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    still_missing = []
    for package, version in missing:
        path = tarball_path(cache, package, version)
        if check_tarball(path, package, version):
            tarballs[package, version] = path
        else:
            still_missing.append(f"{package}@{version}")
    if still_missing:
        raise MissingPackageError(still_missing, cache, f"npm pack failed: {reason}")
    return tarballs


def sri_hash(data, algorithm):
    """Subresource-integrity digest of ``data``: base64 of the raw hash."""
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")


def make_offline(html_dir, cache):
    """Rewrite a published asv site to load its scripts and styles locally.

    Every ``<script src>`` / ``<link href>`` to a CDN in the site's HTML pages
    is pointed at ``vendor/<package>@<version>/<file>``, copied from the npm
    tarball (with the fonts and images its stylesheet names). An
    ``integrity`` attribute stays where the local file has that exact hash,
    and is dropped where the npm file differs from the CDN's (an unminified
    build); ``vendor/manifest.json`` records which.

    Parameters
    ----------
    html_dir : path
        The output of ``asv publish``.
    cache : path
        Folder of the npm tarballs (see :func:`fetch_packages`).

    Returns
    -------
    list of dict
        One row per vendored file: url, package, version, file, local path,
        integrity kept or not.

    Raises
    ------
    MissingPackageError
        When a package is not available.
    DashboardError
        When a page loads an external file that is not in ``VENDOR_FILES``.
    """
    html_dir = pathlib.Path(html_dir)
    pages = sorted(html_dir.glob("*.html"))
    if not (html_dir / "index.html").is_file():
        raise DashboardError(f"{html_dir} holds no published asv site (index.html)")
    table = {url: (package, version, member) for url, package, version, member in VENDOR_FILES}
    unknown = sorted({url for page in pages
                      for url in EXTERNAL_TAG.findall(page.read_text(encoding="utf-8"))
                      if url not in table})
    if unknown:
        raise DashboardError("asv's page loads files that fastbn.dashboard has no local copy "
                             "for: " + ", ".join(unknown))
    tarballs = fetch_packages(cache)
    rows = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")

        def replace(match):
            url = match.group(1)
            package, version, member = table[url]
            data, local = _vendor_file(html_dir, tarballs[package, version], package, version,
                                       member)
            tag = match.group(0).replace(url, local)
            found = re.search(r"\sintegrity=\"(sha\d+)-([^\"]+)\"", tag)
            kept = bool(found) and sri_hash(data, found.group(1)) == found.group(2)
            if found and not kept:
                tag = tag.replace(found.group(0), "")
            # Same origin now: no CORS request, no referrer policy needed.
            tag = re.sub(r"\s(crossorigin|referrerpolicy)=\"[^\"]*\"", "", tag)
            rows[url] = {"url": url, "package": package, "version": version, "file": member,
                         "path": local, "integrity_kept": kept}
            return tag

        page.write_text(EXTERNAL_TAG.sub(replace, text), encoding="utf-8")
    manifest = [rows[url] for url, *_ in VENDOR_FILES if url in rows]
    (html_dir / VENDOR_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2),
                                                         encoding="utf-8")
    return manifest


def _vendor_file(html_dir, tarball, package, version, member):
    """Copy ``member`` of an npm tarball (and what a stylesheet refers to) into the site.

    Returns
    -------
    bytes, str
        The file's content and its link, relative to the site root.
    """
    prefix = f"{VENDOR_DIR}/{package}@{version}"
    with tarfile.open(tarball, "r:gz") as tar:
        names = set(tar.getnames())

        def copy(name):
            try:
                data = tar.extractfile(f"package/{name}").read()
            except (KeyError, AttributeError) as exc:
                raise DashboardError(f"{package}@{version} has no file {name}") from exc
            dest = html_dir / prefix / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            return data

        data = copy(member)
        if member.endswith(".css"):
            for ref in CSS_URL.findall(data.decode("utf-8", "replace")):
                if ref.startswith(("data:", "http:", "https:", "//", "#")):
                    continue
                name = os.path.normpath(os.path.join(os.path.dirname(member),
                                                     ref.split("?")[0].split("#")[0]))
                if f"package/{name}" in names:
                    copy(name)
    return data, f"{prefix}/{member}"


# Serving and the browser ----------------------------------------------------

def free_port(port):
    """``port`` if it is free, else a free port chosen by the system."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
            return port
        except OSError:
            pass
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serve(html_dir):
    """Serve ``html_dir`` on 127.0.0.1 in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def find_chromium():
    """Path of a Chromium executable: ``FASTBN_CHROMIUM`` or one on ``PATH``; None if none."""
    if os.environ.get("FASTBN_CHROMIUM"):
        return shutil.which(os.environ["FASTBN_CHROMIUM"])
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


# Evaluated in the page: what was loaded and what the graph shows.
PAGE_STATE_JS = r"""
(function () {
  var state = {href: location.href, title: document.title,
               text: document.body ? document.body.innerText.slice(0, 2000) : ""};
  var $ = window.jQuery;
  state.libraries = {
    jquery: !!$,
    flot: !!($ && $.plot),
    flot_plugins: ($ && $.plot && $.plot.plugins) ?
      $.plot.plugins.map(function (p) { return p.name; }) : [],
    stupidtable: !!($ && $.fn.stupidtable && $.fn.stupidsort),
    bootstrap: !!($ && $.fn.modal && $.fn.tooltip),
    md5: typeof window.md5 === "function",
    bootstrap_css: !!$ && $(".navbar").length > 0 && $(".navbar").css("position") === "fixed",
    asv: !!($ && $.asv && $.asv.main_json)
  };
  // A table sorted by stupidtable (asv marks the sorted column asc/desc):
  // the column, the direction, and its sort values in row order.
  state.sorted_table = null;
  var th = $ ? $("thead th.asc, thead th.desc").first() : [];
  if (th.length) {
    var column = th.index();
    var values = [];
    th.closest("table").find("tbody tr").each(function () {
      var value = $(this).children().eq(column).attr("data-sort-value");
      values.push(value === undefined ? null : parseFloat(value));
    });
    state.sorted_table = {column: th.text().trim(),
                          direction: th.hasClass("desc") ? "desc" : "asc", values: values};
  }
  var plot = $ ? $("#main-graph").data("plot") : null;
  state.plot = null;
  if (plot) {
    var axes = plot.getAxes();
    var canvas = plot.getCanvas();
    var pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    var series = plot.getData();
    // Pixels in a series' colour (within 24 per channel): the drawn data,
    // not the grid or the labels.
    var colors = series.map(function (s) {
      var c = $.color.parse(s.color);
      return [c.r, c.g, c.b];
    });
    var series_pixels = 0;
    var pixels_by_series = colors.map(function () { return 0; });
    for (var i = 0; i < pixels.length; i += 4) {
      if (pixels[i + 3] < 128) { continue; }
      for (var k = 0; k < colors.length; k++) {
        if (Math.abs(pixels[i] - colors[k][0]) < 24 && Math.abs(pixels[i + 1] - colors[k][1]) < 24 &&
            Math.abs(pixels[i + 2] - colors[k][2]) < 24) {
          series_pixels += 1;
          pixels_by_series[k] += 1;
          break;
        }
      }
    }
    state.plot = {
      x_label: axes.xaxis.options.axisLabel || "",
      x_mode: axes.xaxis.options.mode || "",
      y_label: axes.yaxis.options.axisLabel || "",
      x_ticks: axes.xaxis.ticks.map(function (t) { return t.label; }),
      series_pixels: series_pixels,
      canvas: [canvas.width, canvas.height],
      series: series.map(function (s, k) {
        var finite = [], missing = 0, non_finite = 0;
        s.data.forEach(function (p) {
          if (p[1] === null || p[1] === undefined) { missing += 1; }
          else if (isFinite(p[1])) { finite.push([p[0], p[1]]); }
          else { non_finite += 1; }
        });
        // Where flot draws the points: x after the plugins (categories,
        // orderBars) moved it; NaN or null means the point is not drawn.
        var drawn_x = [], ps = s.datapoints.pointsize, dp = s.datapoints.points;
        for (var j = 0; j + 1 < dp.length; j += ps) {
          if (dp[j + 1] !== null) { drawn_x.push(dp[j]); }
        }
        return {label: s.label || "", color: s.color, points: finite, missing: missing,
                non_finite: non_finite, pixels: pixels_by_series[k],
                drawn_x: drawn_x.map(function (x) { return isFinite(x) ? x : null; })};
      })
    };
  }
  return JSON.stringify(state);
})()
"""


def render_page(url, screenshot=None, chromium=None, timeout=60.0, size=(1400, 900)):
    """Open ``url`` in headless Chromium; report what loaded and what was drawn.

    Chromium runs with a fresh profile and is driven over the Chrome DevTools
    protocol (``websocket-client``). The page counts as rendered once asv's
    graph exists and pixels of its series' colours are on the canvas, or a
    table of the page is sorted (or at ``timeout``).

    Parameters
    ----------
    url : str
    screenshot : path, optional
        Where to save a PNG of the page.
    chromium : str, optional
        The executable (default: :func:`find_chromium`).
    timeout : float
        Seconds to wait for the graph.
    size : (int, int)
        Window width and height.

    Returns
    -------
    dict
        ``state`` (the page's state, see ``PAGE_STATE_JS``), ``failed_requests``
        (url and error of every load that failed or got an HTTP error),
        ``exceptions`` and ``console_errors`` (JavaScript), ``requests`` (every
        URL requested), ``screenshot`` (the PNG path or None).
    """
    try:
        import websocket
    except ImportError as exc:
        raise DashboardError("rendering the page needs websocket-client: "
                             "pip install websocket-client") from exc
    chromium = chromium or find_chromium()
    if not chromium:
        raise DashboardError("Chromium not found (apt-get install chromium, or set "
                             "FASTBN_CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="fastbn-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--window-size={size[0]},{size[1]}", "about:blank"]
        log_path = pathlib.Path(profile) / "chromium.log"
        with open(log_path, "wb") as log:
            # Its own process group: the browser's helper processes end with it.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            port = _devtools_port(pathlib.Path(profile), process, log_path)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            target = next(t for t in targets if t.get("type") == "page")
            connection = websocket.create_connection(target["webSocketDebuggerUrl"],
                                                     timeout=timeout, suppress_origin=True)
            try:
                return _drive_page(_DevTools(connection), url, screenshot, timeout, size)
            finally:
                connection.close()
        finally:
            _stop_group(process)


def _stop_group(process):
    """End a process started with ``start_new_session=True`` and its group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            # Helpers of the group may outlive the main process for a moment.
            time.sleep(0.2)
            return
        except subprocess.TimeoutExpired:
            continue


def _devtools_port(profile, process, log_path, timeout=30.0):
    """The DevTools port that Chromium writes into its profile folder."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active.is_file():
            lines = active.read_text().split()
            if lines:
                return int(lines[0])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    log = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
    raise DashboardError(f"Chromium did not start (status {process.poll()}): {log}")


class _DevTools:
    """Commands and events of one DevTools websocket."""

    def __init__(self, connection):
        self.connection = connection
        self.events = []
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.connection.send(json.dumps({"id": self.next_id, "method": method,
                                         "params": params}))
        while True:
            message = json.loads(self.connection.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise DashboardError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)


def _drive_page(devtools, url, screenshot, timeout, size):
    for domain in ("Page", "Network", "Runtime", "Log"):
        devtools.call(f"{domain}.enable")
    devtools.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)
    devtools.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    state = {}
    drawn_since = None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        result = devtools.call("Runtime.evaluate", expression=PAGE_STATE_JS,
                               returnByValue=True)
        value = result.get("result", {}).get("value")
        if not value:
            continue
        state = json.loads(value)
        if "error.html" in state["href"]:
            break
        table = state.get("sorted_table")
        if (state["plot"] and state["plot"]["series_pixels"] > 0) or (table and table["values"]):
            # Let the overview and the tick labels settle before the picture.
            drawn_since = drawn_since or time.monotonic()
            if time.monotonic() - drawn_since > 1.0:
                break
    if screenshot:
        shot = devtools.call("Page.captureScreenshot", format="png")
        path = pathlib.Path(screenshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
    requests = {}
    failed = []
    exceptions = []
    console_errors = []
    for event in devtools.events:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            requests[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed":
            failed.append({"url": requests.get(params["requestId"], "?"),
                           "error": params.get("errorText", "")})
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            failed.append({"url": params["response"]["url"],
                           "error": f"HTTP {params['response']['status']}"})
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exceptions.append(details.get("exception", {}).get("description")
                              or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            console_errors.append(" ".join(str(arg.get("value", arg.get("description", "")))
                                           for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            console_errors.append(f"{params['entry'].get('text', '')} "
                                  f"{params['entry'].get('url', '')}".strip())
    return {"url": url, "state": state, "failed_requests": failed, "exceptions": exceptions,
            "console_errors": console_errors, "requests": sorted(set(requests.values())),
            "screenshot": str(screenshot) if screenshot else None}


def page_problems(report):
    """What is wrong with a rendered asv page, as a list of strings (empty: fine).

    Parameters
    ----------
    report : dict
        From :func:`render_page`.

    Returns
    -------
    list of str
    """
    problems = []
    state = report["state"]
    if not state:
        problems.append("the page never answered")
        return problems
    if "error.html" in state["href"] or "failed to load" in state.get("text", ""):
        problems.append("asv's error page: an external dependency failed to load")
    problems += [f"failed load {row['url']} ({row['error']})"
                 for row in report["failed_requests"]]
    problems += [f"exception {text}" for text in report["exceptions"]]
    problems += [f"console error {text}" for text in report["console_errors"]]
    missing = [name for name, ok in state.get("libraries", {}).items()
               if name != "flot_plugins" and not ok]
    if missing:
        problems.append("not loaded: " + ", ".join(missing))
    plot = state.get("plot")
    if not plot:
        problems.append("no graph")
    else:
        if plot["series_pixels"] == 0:
            problems.append("no series is drawn on the graph canvas")
        if not any(series["points"] for series in plot["series"]):
            problems.append("the graph has no finite point")
        non_finite = [series["label"] for series in plot["series"] if series["non_finite"]]
        if non_finite:
            problems.append("non-finite values in " + ", ".join(non_finite))
    return problems
