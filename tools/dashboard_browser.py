"""Tooling, not part of the installed fastbn: asv's published page in headless Chromium.

``tests/test_dashboard.py`` uses it to check what the page of ``fastbn
dashboard`` loads and draws, and its command line makes the screenshot of the
dashboard in docs/performance.md (``docs/dashboard.png``) from a published site::

    fastbn dashboard --quick --offline --no-serve
    python tools/dashboard_browser.py .asv/html docs/dashboard.png \
        --page 'bench_batchnorm.BackwardStaged.track_speedup_simplified_over_staged?x-axis=backend&y-axis-scale=log'

Chromium (Debian's ``chromium``, or ``FASTBN_CHROMIUM``) runs with a fresh
profile and is driven over the Chrome DevTools protocol with
``websocket-client``; the site is served on 127.0.0.1 from a thread.
"""
import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from fastbn.dashboard import SPEEDUP_BENCHMARK

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0"]


class BrowserError(RuntimeError):
    """Chromium could not be started or driven; the message says why."""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serve(html_dir):
    """Serve a folder over HTTP on 127.0.0.1, from a thread, for a ``with`` block.

    Parameters
    ----------
    html_dir : path

    Yields
    ------
    str
        The base URL, ``http://127.0.0.1:PORT/`` (a free port).
    """
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
    """Find a Chromium executable.

    Returns
    -------
    str or None
        ``FASTBN_CHROMIUM`` resolved on ``PATH`` when set, else the first of
        ``CHROMIUM_NAMES`` on ``PATH``; None when there is none.
    """
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
        raise BrowserError("rendering the page needs websocket-client: "
                             "pip install websocket-client") from exc
    chromium = chromium or find_chromium()
    if not chromium:
        raise BrowserError("Chromium not found (apt-get install chromium, or set "
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
    raise BrowserError(f"Chromium did not start (status {process.poll()}): {log}")


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
                    raise BrowserError(f"DevTools {method}: {message['error']}")
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


def main(argv=None):
    """Screenshot a page of a published asv site, failing unless it rendered.

    Parameters
    ----------
    argv : list of str, optional
        ``HTML_DIR PNG [--page FRAGMENT] [--timeout S]`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when the page rendered and the PNG was saved; 1 when the page has
        problems (listed on stderr); 2 when Chromium could not be driven.
    """
    parser = argparse.ArgumentParser(
        prog="tools/dashboard_browser.py",
        description="Open a page of a published asv site in headless Chromium, check that "
                    "every script loaded and the graph was drawn, and save a PNG.")
    parser.add_argument("html_dir", help="the site, as asv publish wrote it")
    parser.add_argument("png", help="where to save the screenshot")
    parser.add_argument("--page", default=SPEEDUP_BENCHMARK,
                        help="the part of asv's URL after '#' (e.g. BENCHMARK?x-axis=backend "
                             "for bars per backend) [the speedup graph]")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the graph [60]")
    args = parser.parse_args(argv)
    if not (pathlib.Path(args.html_dir) / "index.html").is_file():
        parser.error(f"{args.html_dir} holds no published asv site (index.html)")
    try:
        with serve(args.html_dir) as url:
            page = f"{url}#{args.page}"
            report = render_page(page, args.png, timeout=args.timeout)
    except BrowserError as exc:
        print(f"dashboard_browser: error: {exc}", file=sys.stderr)
        return 2
    problems = page_problems(report)
    if problems:
        print("dashboard_browser: the page did not render: " + "; ".join(problems),
              file=sys.stderr)
        return 1
    print(f"dashboard_browser: screenshot of {page} saved to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
