"""The documentation: every link resolves, and README's Quick start holds its two commands.

Links are checked in README.md, docs/*.md and benchmarks/README.md: a
relative target must exist in the repository, and an anchor (``#...``) must
name a heading of the page it points to (GitHub's rule: lower case, spaces
to hyphens, punctuation other than hyphens and underscores dropped). Web
addresses are not fetched.
"""
import argparse
import glob
import os
import re
import shlex
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md")]
               + glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 250

if not os.path.exists(os.path.join(ROOT, "pyproject.toml")):
    pytest.skip("needs the repository's documents", allow_module_level=True)

# [text](target) and ![alt](target), outside code blocks and code spans
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(path):
    """The page's lines outside fenced code blocks, with code spans removed."""
    lines, fenced = [], False
    with open(path, encoding="utf-8") as page:
        for line in page:
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(path):
    """GitHub's anchors of the headings of a markdown page."""
    names = set()
    for line in prose(path):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            title = match.group(1).strip().lower()
            names.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return names


def links():
    for page in PAGES:
        for line in prose(page):
            for target in LINK.findall(line):
                yield pytest.param(page, target, id=f"{os.path.relpath(page, ROOT)}:{target}")


@pytest.mark.parametrize("page, target", list(links()))
def test_link_resolves(page, target):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):
        return  # a web address: not fetched here
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(resolved), f"{target!r} in {page}: no {resolved}"
    if anchor:
        assert resolved.endswith(".md"), f"{target!r}: an anchor into a non-markdown file"
        assert anchor in anchors(resolved), f"{target!r} in {page}: no heading #{anchor}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = "".join(prose(os.path.join(ROOT, "README.md")))
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        name = "docs/" + os.path.basename(page)
        assert f"]({name}" in readme, f"README.md does not link {name}"


def test_readme_is_a_front_door():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        assert len(readme.readlines()) <= README_MAX_LINES


def quick_start_commands():
    """The command lines of README's Quick start block, comments dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()
            if line.split("#", 1)[0].strip()]


def test_quick_start_holds_the_two_commands():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    commands = quick_start_commands()
    assert commands == ['pip install ".[bench]" && fastbn bench --quick',
                        'pip install ".[test]" && pytest'], commands
    # The extras they install exist, the script is installed, pytest comes with [test].
    extras = project["optional-dependencies"]
    assert {"bench", "test"} <= set(extras)
    assert any(requirement.startswith("pytest") for requirement in extras["test"])
    assert project["scripts"]["fastbn"] == "fastbn.__main__:main"
    # `fastbn bench --quick` is a command line that fastbn's parser takes.
    from fastbn.__main__ import add_bench_arguments
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    bench = shlex.split(commands[0].split("&&", 1)[1])
    assert bench[:2] == ["fastbn", "bench"]
    assert parser.parse_args(bench[2:]).quick
