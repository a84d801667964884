"""A suite's report: a Markdown page (``benchmarks/results/*.md``) and JSON.

A page begins with the command that made it, the date, the processor
(:func:`fastbn.machine.summary`), the core count, the load average before
and after, the versions and the source of fastbn's kernel plans (default
or wisdom, :func:`plan_source`); then which bars are met, the tables, and
the warnings of the timing core.
"""
import datetime
import json
import platform
import time
from importlib import metadata

from .. import machine

PACKAGES = ("fastbn", "numpy", "numba", "torch", "ml_dtypes", "threadpoolctl", "mpi4py",
            "numba-cuda")


def versions():
    """``name -> version`` of Python and the installed packages that matter."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def plan_source():
    """Where fastbn's kernel plans come from in this process, in one line.

    Reads :func:`fastbn.plans.status` (loading the wisdom file first if no
    planned kernel has run yet), e.g. ``"default (FASTBN_WISDOM=off)"`` or
    ``"wisdom from /home/me/.cache/fastbn/wisdom.json (stored call classes:
    numba 12)"``.

    Returns
    -------
    str
    """
    from .. import plans

    found = plans.status()
    if not found["in_use"] and found["reason"] == "not loaded yet":
        plans.load(plans.builds())
        found = plans.status()
    reason = found["reason"].removesuffix(": default plans")
    if found["in_use"]:
        classes = ", ".join(f"{b} {n}" for b, n in found["classes"].items())
        text = f"{reason} (stored call classes: {classes})"
    else:
        text = f"default ({reason})"
    if found["tuning"] != "off":
        text += f"; tuning mode {found['tuning']}"
    return text


def cell(value, digits=2, suffix=""):
    """A table cell: ``-`` for None, else the number with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{suffix}"


class Report:
    """What one suite run found.

    Parameters
    ----------
    title : str
    command : str
        The command that makes the page, as a user types it.
    """

    def __init__(self, title, command):
        self.title = title
        self.command = command
        self.started = time.time()
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.machine = machine.describe()
        self.versions = versions()
        self.load_before = machine.load_average()
        self.load_after = None
        self.seconds = None
        self.plans = None     # plan_source(), read at the end (the kernels load wisdom)
        self.facts = []       # "- name: value" lines under the header
        self.bars = []        # (description, met, detail)
        self.sections = []    # (heading, text, columns, rows)
        self.warnings = []
        self.highest_load = None   # the highest load average above the cores in a group
        self.data = {}        # raw figures for --json

    def add_fact(self, text):
        self.facts.append(text)

    def add_bar(self, description, met, detail=""):
        """A bar of an issue or of the README: ``met`` True, False or None (not measured)."""
        self.bars.append((description, met, detail))

    def add_table(self, heading, columns, rows, text=""):
        """A Markdown table; ``rows`` are lists of cells (str)."""
        self.sections.append((heading, text, list(columns), [list(r) for r in rows]))

    def add_warnings(self, lines):
        """Warnings of the timing core; a load above the cores is said once, at its highest."""
        for line in lines:
            if "load average" in line and "above the" in line:
                load = float(line.split("load average ")[1].split()[0])
                self.highest_load = max(self.highest_load or 0.0, load)
            elif line not in self.warnings:
                self.warnings.append(line)

    def finish(self):
        """Record the load average and the wall time at the end."""
        self.load_after = machine.load_average()
        self.seconds = time.time() - self.started
        self.plans = plan_source()
        return self

    def to_markdown(self):
        """The page, as text."""
        loads = " / ".join(cell(v, 2) for v in (self.load_before, self.load_after))
        version_text = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [f"# {self.title}", "",
                 f"Made by `{self.command}` on {self.date} ({cell(self.seconds, 0)} s).", "",
                 f"- processor: {machine.summary()}",
                 f"- cores: {self.machine['cores']}; load average (1 min) before / after: "
                 f"{loads}",
                 f"- versions: {version_text}"]
        if self.plans:
            lines.append(f"- plans: {self.plans}")
        lines += [f"- {fact}" for fact in self.facts]
        if self.bars:
            lines += ["", "## Bars", ""]
            for description, met, detail in self.bars:
                verdict = {True: "met", False: "**missed**", None: "not measured"}[met]
                lines.append(f"- {verdict}: {description}" + (f" ({detail})" if detail else ""))
        for heading, text, columns, rows in self.sections:
            lines += ["", f"## {heading}", ""]
            if text:
                lines += [text, ""]
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        warnings = list(self.warnings)
        if self.highest_load is not None:
            warnings.insert(0, f"load average up to {self.highest_load:.1f} above the "
                               f"{self.machine['cores']} cores while timing: other processes "
                               "took CPU time, times may be slow and spreads wide (ratios "
                               "within a round hold better)")
        if warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
        return "\n".join(lines) + "\n"

    def to_json(self):
        """The figures and the header as a JSON text."""
        return json.dumps({
            "title": self.title, "command": self.command, "date": self.date,
            "seconds": self.seconds, "machine": self.machine, "versions": self.versions,
            "load_before": self.load_before, "load_after": self.load_after,
            "plans": self.plans, "bars": [{"bar": b, "met": m, "detail": d} for b, m, d in self.bars],
            "tables": {h: [dict(zip(c, r)) for r in rows] for h, _, c, rows in self.sections},
            "warnings": self.warnings, "data": self.data}, indent=1, default=str)


def parse_tables(markdown):
    """The tables of a page: ``heading -> list of dict`` (column -> cell text)."""
    tables = {}
    heading = None
    columns = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading, columns = line[3:].strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
                tables[heading] = []
            elif set("".join(cells)) <= set("-: "):
                continue
            else:
                if len(cells) != len(columns):
                    raise ValueError(f"row of {len(cells)} cells under {len(columns)} "
                                     f"columns in {heading!r}: {line}")
                tables[heading].append(dict(zip(columns, cells)))
        else:
            columns = None if not line.startswith("|") else columns
    return tables
