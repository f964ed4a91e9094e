"""The documentation the code cites is in the repository, and every section it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS_DOC = REPO / "docs" / "methods.md"
CITING = [*(REPO / "medda").rglob("*.py"), *(REPO / "pipelines").rglob("*.py"), REPO / "README.md"]


def _headings() -> tuple[set[str], set[str]]:
    """Section numbers ("2", "2.3") and titles of docs/methods.md."""
    numbers, titles = set(), set()
    for line in METHODS_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{2,3} (?:(\d+(?:\.\d+)?)\.? )?(.+)", line)
        if match:
            if match.group(1):
                numbers.add(match.group(1))
            titles.add(match.group(2).strip())
    return numbers, titles


def _cited_sections(text: str) -> set[str]:
    """Section numbers cited as `docs/methods.md section 2.2`, `... sections 1, 2 and 6` or `docs/methods.md 2.3`."""
    cited = set()
    for match in re.finditer(r"docs/methods\.md,?\s+(?:sections?\s+)?((?:\d+(?:\.\d+)?(?:,\s*|\s+and\s+)?)+)", text):
        cited.update(re.findall(r"\d+(?:\.\d+)?", match.group(1)))
    return cited


def test_cited_method_sections_exist():
    numbers, titles = _headings()
    assert {"1", "2", "2.1", "2.2", "2.3", "3", "4", "5", "6", "7"} <= numbers
    missing = {}
    for path in CITING:
        text = path.read_text(encoding="utf-8")
        absent = _cited_sections(text) - numbers
        absent |= {t for t in re.findall(r'docs/methods\.md, "([^"]+)"', text) if t not in titles}
        if absent:
            missing[str(path.relative_to(REPO))] = sorted(absent)
    assert missing == {}


def test_citation_parser_sees_citations():
    assert _cited_sections("see docs/methods.md sections 1, 2 and 6.") == {"1", "2", "6"}
    assert _cited_sections("(docs/methods.md 2.3)") == {"2.3"}
    assert "2.2" in _cited_sections((REPO / "medda/methods/osuda.py").read_text(encoding="utf-8"))


def test_docs_stand_alone():
    """Nothing in the repository's docs, code or README points at material outside the repository."""
    for path in [*CITING, *(REPO / "docs").glob("*.md")]:
        assert "shared/docs" not in path.read_text(encoding="utf-8"), path
