"""``fastbn dashboard``: the asv dashboard of the benchmarks in one command.

Run from a clone of the repository (it reads ``asv.conf.json`` and
``benchmarks/``); ``fastbn/__main__.py`` adds the options with
:func:`add_arguments` and runs the command with :func:`run`. The package
has one module per concern:

- ``_asv``: the asv steps (machine, run, publish, preview), the command
  line and the git and configuration helpers they need;
- ``_scripts``: the scripts of asv's page: the bar-graph fix that
  ``fastbn dashboard`` adds to every published site, and the local copies
  of the CDN files that ``--offline`` takes from npm packages;
- ``_errors``: the errors both raise.

The headless-Chromium driver that opens the published page (the tests'
checks and the documentation's screenshot) is tooling, not part of the package:
``tools/dashboard_browser.py`` in the repository.
"""
from ._asv import (COPY_LIMIT_BENCHMARKS, PROFILES, SPEEDUP_BENCHMARK, add_arguments,
                   ensure_machine, find_config, quick_arguments, read_config, run,
                   stored_results, write_config)
from ._errors import DashboardError, MissingPackageError
from ._scripts import (EXTERNAL_TAG, ORDERBARS_FIX, ORDERBARS_FIX_JS, VENDOR_DIR, VENDOR_FILES,
                       check_tarball, fetch_packages, fix_category_bars, make_offline,
                       npm_cache_dir, tarball_path, vendor_packages)

__all__ = [
    "COPY_LIMIT_BENCHMARKS", "PROFILES", "SPEEDUP_BENCHMARK", "add_arguments", "run",
    "ensure_machine", "find_config", "quick_arguments", "read_config", "stored_results",
    "write_config", "DashboardError", "MissingPackageError", "EXTERNAL_TAG", "ORDERBARS_FIX",
    "ORDERBARS_FIX_JS", "VENDOR_DIR", "VENDOR_FILES", "check_tarball", "fetch_packages",
    "fix_category_bars", "make_offline", "npm_cache_dir", "tarball_path", "vendor_packages",
]
