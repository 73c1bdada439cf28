"""README and the docs it indexes point at files that exist, and no doc is left out of README's index.

Comments in the code and the grid files cite the docs by path ("docs/nft-default.md, item 14"); a file moved
or renamed would leave those citations pointing nowhere.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

DOCS = Path("docs")
CITED = re.compile(r"\bdocs/[\w.-]+\.md\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _sources() -> List[Path]:
    files = [Path("README.md"), *DOCS.glob("*.md")]
    for folder, pattern in (("core", "*.py"), ("modalities", "*.py"), ("tools", "*.py"), ("tests", "*.py"),
                            ("configs", "*.yaml")):
        files += Path(folder).rglob(pattern)
    return sorted(files)


def test_every_cited_doc_exists():
    problems = []
    for source in _sources():
        text = source.read_text()
        problems += [f"{source} cites {m}" for m in sorted(set(CITED.findall(text))) if not Path(m).is_file()]
        if source.suffix == ".md":   # relative Markdown links resolve from the linking file's folder
            problems += [f"{source} links {m}" for m in sorted(set(MD_LINK.findall(text)))
                         if not (source.parent / m).is_file()]
    assert not problems, f"{len(problems)} citations point at no file (fix the path or restore the file): {problems}"


def test_the_citation_patterns_find_what_they_should():
    assert CITED.findall("see docs/nft-default.md, item 14; not mydocs/x.txt") == ["docs/nft-default.md"]
    assert MD_LINK.findall("[a](docs/results.md) [b](video.md#top) [c](http://x/y.html)") == ["docs/results.md", "video.md"]


def test_readme_indexes_every_doc():
    readme = Path("README.md").read_text()
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ has no Markdown files"
    unlisted = [str(p) for p in docs if f"]({p.as_posix()})" not in readme]
    assert not unlisted, f"README's Documentation table links none of {unlisted}; add a row for each"
