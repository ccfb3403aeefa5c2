"""The package's own docs cover what the registry holds (a user's clone has no ../shared)."""

from __future__ import annotations

from pathlib import Path

from lightning_merge import method_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_registered_method_is_documented():
    methods = (DOCS / "methods.md").read_text()
    mapping = (DOCS / "mergekit.md").read_text()
    for name in method_names():
        assert f"`{name}`" in methods, name
        assert f"`{name}`" in mapping, name


def test_readme_links_to_docs_inside_the_repository():
    readme = (DOCS.parent / "README.md").read_text()
    assert "../shared" not in readme and "(docs/methods.md)" in readme and "(docs/mergekit.md)" in readme
    for page in ("README.md", "methods.md", "mergekit.md"):
        assert "../shared" not in (DOCS / page).read_text()
