"""``fastbn dashboard``: run the asv suite, store the results, publish and serve.

The command strings together the asv steps that a dashboard needs, from a
clone of the repository (it reads ``asv.conf.json`` and ``benchmarks/``):

1. ``asv machine --yes`` when the machine is not yet in ``~/.asv-machine.json``;
2. ``asv run RANGE`` in asv's own environments, when ``--commits`` is given;
3. ``asv run --python=same --set-commit-hash HEAD``: the installed fastbn,
   stored under the current commit (without the hash asv stores nothing);
4. ``asv publish`` into ``--html-dir``, and the bar-graph fix of
   :mod:`fastbn.dashboard._scripts` added to the site;
5. with ``--offline``, the page's scripts and stylesheets copied into the
   site from npm packages (:func:`fastbn.dashboard._scripts.make_offline`);
6. ``asv preview`` on that directory, unless ``--no-serve``.

Standard library only (asv runs in a child process).
"""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile

from ._errors import DashboardError
from ._scripts import fetch_packages, fix_category_bars, make_offline, npm_cache_dir

SPEEDUP_BENCHMARK = "bench_batchnorm.BackwardStaged.track_speedup_simplified_over_staged"
COPY_LIMIT_BENCHMARKS = ("bench_batchnorm.Forward.track_fraction_of_copy_limit",
                         "bench_batchnorm.Backward.track_fraction_of_copy_limit")
PROFILES = ("default", "quick", "tiny", "slow")


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

    Parameters
    ----------
    path : path, optional
        ``--config``; without it the current folder and its parents are searched.

    Returns
    -------
    pathlib.Path
        The absolute path of the file.

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
    """Read asv's configuration.

    Parameters
    ----------
    path : path
        ``asv.conf.json``; lines that are ``//`` comments (asv allows them) are skipped.

    Returns
    -------
    dict
    """
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
    """Run ``python -m asv ARGV`` with this Python (``--python=same`` is this one).

    Parameters
    ----------
    argv : sequence of str
        asv's subcommand and its options.
    env : dict
        Environment of the asv process.

    Raises
    ------
    DashboardError
        When asv is not installed.
    subprocess.CalledProcessError
        When asv exits with a non-zero status.
    """
    try:
        import asv as _asv  # noqa: F401
    except ImportError as exc:
        raise DashboardError("asv is not installed: pip install 'fastbn[bench]'") from exc
    subprocess.run([sys.executable, "-m", "asv"] + list(argv), env=env, check=True)


def _git_process(repo, argv, check):
    """``git -C repo ARGV``, its output captured as text."""
    return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True,
                          check=check)


def git(repo, *argv):
    """Run a git command in ``repo`` and return what it printed.

    Parameters
    ----------
    repo : path
    *argv : str
        git's subcommand and its options.

    Returns
    -------
    str
        Standard output, stripped.

    Raises
    ------
    DashboardError
        When git is missing or the command fails (``repo`` is not a clone).
    """
    try:
        result = _git_process(repo, argv, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DashboardError(f"git {' '.join(argv)} failed in {repo}: the dashboard needs "
                             "a git clone of the repository") from exc
    return result.stdout.strip()


def git_ok(repo, *argv):
    """Whether a git command, given as to :func:`git`, exits with status 0 in ``repo``.

    Returns
    -------
    bool
    """
    return _git_process(repo, argv, check=False).returncode == 0


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

    Parameters
    ----------
    results_dir : path
        asv's results folder.
    machine : str
        The asv machine name (a folder of ``results_dir``).
    commit : str
        The full commit hash.

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


def free_port(port):
    """A TCP port for ``asv preview``.

    Parameters
    ----------
    port : int
        The port asked for.

    Returns
    -------
    int
        ``port`` if it can be bound, else a free one chosen by the system.
    """
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
            return port
        except OSError:
            pass
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
