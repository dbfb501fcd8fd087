"""BENCHMARKS.md and docs/experiments.md: generated from the results as they are, short enough to
read (BENCHMARKS.md), and every picture and link in them, and in the README, leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import write_md

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "docs" / "experiments.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (outside code blocks)."""
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_generated_files_match_the_results() -> None:
    for path, text in write_md.render().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `python -m bench.write_md`"


def test_benchmarks_is_at_most_300_lines() -> None:
    lines = (ROOT / "BENCHMARKS.md").read_text().count("\n")
    assert lines <= 300, f"BENCHMARKS.md has {lines} lines; move detail to docs/experiments.md"


def test_benchmarks_opens_with_contents_then_the_cpu_preset() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert text.index("Contents:") < text.index("## ")
    assert headings[:4] == [f"## The `{p}` preset" for p in ("cpu", "tiny", "fast", "paper")]
    # The held-out set is the cpu section's first table: the tuning sets chose the preset.
    cpu = text[text.index("## The `cpu` preset"):text.index("## The `tiny` preset")]
    assert cpu.index("### Held-out set") < cpu.index("### Tuning set")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_and_picture_resolves(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
