"""`medda demo --quick` end to end: the table's rows, the invariants it must show, and the README's copy of it.

The quick budget makes the numbers meaningless (30 source iterations); what is checked is the table's shape and
what holds for any budget and CPU: `none` changes nothing, every verdict is one of the two, each target site gets
its summary line, and the README shows the same rows in the same order as the command prints.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.demo import ADAPTATION, TARGETS, run_demo

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<site>[A-Z])\s+(?P<dice>\d\.\d{3})\s+(?P<hd95>[\d.]+|nan)\s+"
                 r"(?P<assd>[\d.]+|nan)\s*(?P<verdict>.*)$")


def _rows(lines: list[str]) -> list[dict]:
    return [m.groupdict() for line in lines if (m := ROW.match(line))]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("demo")
    printed: list[str] = []  # progress lines
    return run_demo(tmp / "demo_out", quick=True, ssl=True, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                    echo=printed.append)


def test_demo_table_has_every_site_and_method(demo):
    rows = _rows(demo)
    expected = [("source (trained on A)", "A")]
    for site in TARGETS:
        expected += [("source, no adaptation", site)] + [(f"adapted: {m}", site) for m in ADAPTATION]
    expected += [("supervised (2 labelled, best-val)", "A"), ("bcp (2 labelled, best-val)", "A")]
    assert [(r["name"].strip(), r["site"]) for r in rows] == expected
    for r in rows:
        if r["name"].startswith("adapted:"):
            assert re.fullmatch(r"(use adapted|keep source)( \(collapse\))?", r["verdict"].strip()), r
    summaries = [line for line in demo if line.startswith("site ")]
    assert [s.split()[1].rstrip(",") for s in summaries] == list(TARGETS)
    text = "\n".join(demo)
    assert text.count("  recommended: ") == text.count("  kept the source instead of: ") == len(TARGETS)


def test_no_adaptation_is_the_source_model(demo):
    rows = _rows(demo)
    for site in TARGETS:
        source = next(r for r in rows if r["name"].strip() == "source, no adaptation" and r["site"] == site)
        none = next(r for r in rows if r["name"].strip() == "adapted: none" and r["site"] == site)
        assert (none["dice"], none["hd95"], none["assd"]) == (source["dice"], source["hd95"], source["assd"])
        assert none["verdict"].strip() == "keep source"


def test_readme_shows_the_rows_the_demo_prints(demo):
    """The README's tables are runs of the full demo: same rows, same order (the numbers depend on the CPU).

    First block: `medda demo`, with each target site's summary line; second block: the rows `--ssl` adds."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = readme.split("`make demo` runs `medda demo`", 1)[1].split("```\n")
    plain, ssl = blocks[1].splitlines(), blocks[3].splitlines()
    printed = [(r["name"].strip(), r["site"]) for r in _rows(demo)]
    ssl_rows = [row for row in printed if "labelled" in row[0]]
    assert [(r["name"].strip(), r["site"]) for r in _rows(plain)] == [row for row in printed if row not in ssl_rows]
    assert [(r["name"].strip(), r["site"]) for r in _rows(ssl)] == ssl_rows
    assert [line.split()[1].rstrip(",") for line in plain if line.startswith("site ")] == list(TARGETS)
