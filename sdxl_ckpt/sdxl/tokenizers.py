"""Offline CLIP tokenizers for SDXL-shaped models whose vocabulary is the 514 byte-level tokens.

Test models and tiny pipelines have no real tokenizer files, and nothing may be downloaded. A CLIP BPE
vocabulary with no merges (256 byte tokens, their ``</w>`` forms, then ``<|startoftext|>`` and ``<|endoftext|>``
as the two highest ids) tokenizes any prompt offline, and pads as SDXL's two tokenizers do.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdxl_ckpt.sdxl.variants import structure_of

BYTE_LEVEL_VOCAB_SIZE = 514  # 256 byte tokens + 256 "</w>" forms + <|startoftext|> + <|endoftext|>


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: byte tokens, their "</w>" forms, then the two specials (highest ids)."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """Write an offline CLIPTokenizer folder (vocab.json, merges.txt, configs) like the official ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_tokenizers(out_dir: Path, variant: str) -> None:
    """tokenizer/ pads with <|endoftext|> (CLIP-L), tokenizer_2/ with "!" (OpenCLIP), as in SDXL."""
    if structure_of(variant) == "base":
        write_tokenizer(out_dir / "tokenizer", "<|endoftext|>")
    write_tokenizer(out_dir / "tokenizer_2", "!")
