"""README and the docs it indexes point at files that exist, and no doc is left out of README's index.

Comments in the code and the grid files cite the docs by path ("docs/nft-default.md, item 14"); a file moved
or renamed would leave those citations pointing nowhere.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

DOCS = Path("docs")
CITED = re.compile(r"\bdocs/[\w.-]+\.md\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _sources() -> List[Path]:
    files = [Path("README.md"), *DOCS.glob("*.md")]
    for folder, pattern in (("core", "*.py"), ("modalities", "*.py"), ("tools", "*.py"), ("tests", "*.py"),
                            ("configs", "*.yaml")):
        files += Path(folder).rglob(pattern)
    return sorted(files)


@pytest.mark.parametrize("source", [str(p) for p in _sources()])
def test_every_cited_doc_exists(source):
    text = Path(source).read_text()
    missing = sorted({m for m in CITED.findall(text) if not Path(m).is_file()})
    assert not missing, f"{source} cites {missing}, which do not exist; fix the path or restore the file"
    if source.endswith(".md"):   # relative Markdown links resolve from the linking file's folder
        broken = sorted({m for m in MD_LINK.findall(text) if not (Path(source).parent / m).is_file()})
        assert not broken, f"{source} links {broken}, which do not exist"


def test_readme_indexes_every_doc():
    readme = Path("README.md").read_text()
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ has no Markdown files"
    unlisted = [str(p) for p in docs if f"]({p.as_posix()})" not in readme]
    assert not unlisted, f"README's Documentation table links none of {unlisted}; add a row for each"
