"""The scripts and stylesheets of asv's page, as ``fastbn dashboard`` serves them.

Two things change a site that ``asv publish`` wrote:

- :func:`fix_category_bars` adds ``ORDERBARS_FIX_JS``, a small script loaded
  after flot-orderbars so that asv's bar graphs draw (see ``ORDERBARS_FIX``);
- :func:`make_offline` (``--offline``) replaces every script and stylesheet
  that the page loads from a CDN by a local copy, taken from the npm package
  of the same release (``npm pack``, cached outside the repository, see
  :func:`fetch_packages`), and rewrites the links.

Standard library only.
"""
import base64
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tarfile

from ._errors import DashboardError, MissingPackageError

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


# The bar-graph fix -----------------------------------------------------------

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
    """Folder of the npm tarballs that ``--offline`` copies the page's files from.

    Parameters
    ----------
    path : path, optional
        ``--npm-cache``; without it ``FASTBN_NPM_CACHE``, else
        ``$XDG_CACHE_HOME/fastbn/npm`` (``~/.cache/fastbn/npm``).

    Returns
    -------
    pathlib.Path
        The absolute folder (it need not exist yet).
    """
    if path:
        return pathlib.Path(path).expanduser().resolve()
    if os.environ.get("FASTBN_NPM_CACHE"):
        return pathlib.Path(os.environ["FASTBN_NPM_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base, "fastbn", "npm").resolve()


def vendor_packages():
    """The npm packages that ``--offline`` needs.

    Returns
    -------
    list of (str, str)
        ``(package, version)`` pairs, each once, in the order of ``VENDOR_FILES``.
    """
    return list(dict.fromkeys((package, version) for _, package, version, _ in VENDOR_FILES))


def tarball_path(cache, package, version):
    """Where ``npm pack package@version`` leaves its tarball.

    Parameters
    ----------
    cache : path
        The folder given to ``npm pack --pack-destination``.
    package, version : str

    Returns
    -------
    pathlib.Path
        ``cache/<package>-<version>.tgz`` (a scope's ``@`` dropped, its ``/`` a ``-``).
    """
    return pathlib.Path(cache) / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def check_tarball(path, package, version):
    """Whether a file is the npm tarball of one release.

    Parameters
    ----------
    path : path
    package, version : str

    Returns
    -------
    bool
        True when ``path`` is a gzipped tar whose ``package/package.json``
        names ``package`` and ``version``; False when it is missing, not a
        tarball, or another package.
    """
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
    """Subresource-integrity digest of some bytes.

    Parameters
    ----------
    data : bytes
    algorithm : str
        A :mod:`hashlib` name, as in an ``integrity`` attribute (``sha384``).

    Returns
    -------
    str
        Base64 of the raw digest (the part after ``sha384-``).
    """
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
