"""The documentation: the README stays short, the configuration reference is the code's,
and every link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from u2seg.config import PipelineConfig, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # links and pictures


def _keys(cfg: object, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return LINK.findall(text)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200


def test_configuration_reference_is_generated_from_the_code():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown() + "\n", (
        "docs/configuration.md differs from the code: run `u2seg reference > docs/configuration.md`"
    )


def test_every_config_key_is_in_the_reference():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    keys = _keys(PipelineConfig())
    assert len(keys) > 150
    missing = [key for key in keys if f"| `{key}` |" not in reference]
    assert not missing


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(link).name for link in _links(ROOT / "README.md")}
    assert {page.name for page in PAGES[1:]} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor}")
    assert not broken, broken


def test_anchor_rule_matches_githubs():
    page = ROOT / "docs" / "method.md"
    assert "why-the-demo-does-not-use-the-published-maskcut-settings" in _anchors(page)
