"""The README and docs/ point at files that exist, and the README stays a first screen."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_readme_is_a_first_screen_with_its_reference_in_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") < 300
    for front in ("train.py", "sample.py"):
        assert (ROOT / front).read_text(encoding="utf-8").count("\n") < 150
