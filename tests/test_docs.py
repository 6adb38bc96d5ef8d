"""The README and docs/ name only files that exist, and the README's Python example runs.

Checked: every relative Markdown link (and its #anchor, against the target page's headings), and
every word of an inline-code span that looks like a repository path: it starts with a top-level
folder of the repository (``fxsparse/``, ``bench/``, ``docs/``, ``tests/``, ``.ci/``), or with
``passes/`` / ``kernels/`` and ends in ``.py`` (read under ``fxsparse/``). Words with placeholders
(``<gpu>``, ``*``, ``$OUT``) are not paths. Fenced code blocks are not searched for paths; the
README's first ``python`` block is run on a tiny random Llama instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, token_batches

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("fxsparse/", "bench/", "docs/", "tests/", ".ci/")
PACKAGE_PREFIXES = ("passes/", "kernels/")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _prose(page.read_text()), re.M)}


def _links(page: Path):
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        yield target


def _paths(page: Path):
    for span in CODE.findall(_prose(page.read_text())):
        for token in span.split():  # a command line names its script among other words
            token = token.rstrip(".,;:)")
            if any(c in token for c in "<>*$|{}="):
                continue
            if token.startswith(PREFIXES):
                yield token, ROOT / token
            elif token.startswith(PACKAGE_PREFIXES) and token.endswith(".py"):
                yield token, ROOT / "fxsparse" / token


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/ holds no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    missing = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            missing.append(target)
    assert not missing, f"{page.name}: links to nothing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(page):
    missing = [token for token, path in _paths(page) if not path.exists()]
    assert not missing, f"{page.name}: names paths that do not exist: {missing}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's first Python block, as written, on a tiny random Llama on CPU.

    The block names ``model``, ``batches``, ``held_out_ids`` and ``input_ids`` as a user's own;
    the test supplies them."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace = {
        "model": tiny_llama(max_position_embeddings=512),
        "batches": token_batches(4),
        "held_out_ids": torch.randint(0, 96, (512,), generator=torch.Generator().manual_seed(2)),
        "input_ids": token_batches(1, batch=1)[0],
    }
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "plan.json").is_file()
    out = capsys.readouterr().out
    assert "perplexity dense" in out and "mlp.down_proj" in out
    assert namespace["plan"].layers, "the example planned no layer"
