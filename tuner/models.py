"""Model loading: `builtin:NAME` checkpoints shipped with the package, or a local Hugging Face directory.

A few built-ins are generated from the shipped ones on first use into a cache directory (see `tuner.builtin`).

Nothing is ever fetched from a model hub: this tool runs on machines (and CI) without one, so every load
is `local_files_only=True` and a missing model is a clear input error, not a network timeout.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUILTIN_PREFIX = "builtin:"


#: Draft models known for built-in targets (a target's own draft is a property of the model pair).
KNOWN_DRAFTS = {"builtin:tiny": "builtin:tiny-draft"}


def default_draft_model(model_id: str | None) -> str | None:
    """The draft model known for `model_id`, when its checkpoint is present: what `tune` and `bench` put in
    `SearchContext.draft_model` when no `--draft-model` is given (the search space only reads the field)."""
    draft = KNOWN_DRAFTS.get(model_id or "")
    if draft is None:
        return None
    from tuner.builtin import get_builtin_model

    return draft if (get_builtin_model(draft).checkpoint / "config.json").is_file() else None


#: EAGLE draft heads known for built-in targets (`tuner.builtin.train_eagle` trains them).
KNOWN_HEADS = {"builtin:smollm2-135m": "builtin:smollm2-135m-eagle"}


def default_draft_head(model_id: str | None) -> str | None:
    """The draft head known for `model_id`, when its checkpoint is present (`SearchContext.draft_head`)."""
    head = KNOWN_HEADS.get(model_id or "")
    if head is None:
        return None
    from tuner.builtin import get_builtin_model

    return head if (get_builtin_model(head).checkpoint / "config.json").is_file() else None


#: Techniques that only change decoding (their claims are tokens/s on generated text, not prefill)
DECODE_TECHNIQUES = frozenset({"speculative"})


def workload_defaults(model_id: str, techniques: tuple[str, ...] | list[str] = ()) -> Any:
    """The `tuner.builtin.WorkloadDefaults` of a built-in model (tasks, examples, prompt length), or the
    generic ones for anything else (a user's checkpoint directory or GGUF file). A built-in's decode defaults
    apply when every technique is a decoding one (`DECODE_TECHNIQUES`): speculative decoding is measured on
    what it speeds up, long generations after short prompts."""
    from tuner.builtin import BUILTIN_MODELS, WorkloadDefaults

    entry = BUILTIN_MODELS.get(model_id.removeprefix(BUILTIN_PREFIX)) if model_id.startswith(BUILTIN_PREFIX) else None
    if entry is None:
        return WorkloadDefaults()
    if techniques and entry.decode_defaults is not None and set(techniques) <= DECODE_TECHNIQUES:
        return entry.decode_defaults
    return entry.defaults


class ModelSpecError(ValueError):
    """The --model value names nothing loadable (bad builtin name, missing directory)."""


@dataclass
class LoadedModel:
    """A model ready for inference with its tokenizer and the spec the user gave."""

    model: Any
    tokenizer: Any
    model_id: str
    path: Path
    device: torch.device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def canonical_dtype(name: str | None) -> str:
    """The canonical name of a user dtype string (``bf16`` -> ``bfloat16``); None is ``float32``."""
    return str(parse_dtype(name) or torch.float32).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Map a user dtype string to a torch dtype (None keeps the checkpoint's float32 default)."""
    if name is None:
        return None
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ModelSpecError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(_DTYPES))}") from None


def resolve_model_path(spec: str) -> Path:
    """Turn `builtin:NAME` or a local path into the checkpoint directory, or raise ModelSpecError."""
    if spec.startswith(BUILTIN_PREFIX):
        from tuner.builtin import BUILTIN_MODELS, builtin_checkpoint

        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            known = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
            raise ModelSpecError(f"unknown built-in model {spec!r}; known: {known}")
        entry = BUILTIN_MODELS[name]
        if entry.generated_by and not (entry.checkpoint / "config.json").is_file():
            # a pause of seconds and ~hundreds of MB on disk deserve a word (stderr: stdout is for results)
            print(f"generating {spec} into {entry.checkpoint} (first use only)", file=sys.stderr, flush=True)
        try:
            path = Path(builtin_checkpoint(name))
        except OSError as exc:  # missing committed weights, unwritable cache, full disk...
            raise ModelSpecError(f"built-in model {spec!r} is not available: {exc}") from exc
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"built-in model {spec!r} has no checkpoint at {path}")
        return path
    path = Path(os.path.expanduser(spec))
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from tuner.builtin.gguf import gguf_checkpoint

        try:
            return gguf_checkpoint(path)
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"model {spec!r}: {exc}") from exc
    if path.exists():
        raise ModelSpecError(f"model path {spec!r} is neither a Hugging Face checkpoint directory (no config.json) "
                         "nor a .gguf file")
    raise ModelSpecError(
        f"model {spec!r} not found: give builtin:NAME (see `autotune models`), a local checkpoint "
        "directory or a .gguf file (no model hub is used)"
    )


#: the kind of an EAGLE draft-head directory (`policies.draft_heads`): loadable by a policy, not as a model
DRAFT_HEAD = "draft-head"


def checkpoint_kind(path: Path) -> tuple[str, bool]:
    """(kind, needs_remote_code) of a checkpoint directory, from its ``config.json``.

    ``masked-diffusion``: a ``*ForMaskedLM`` architecture, or a LLaDA/Dream-style model type; everything
    else is a causal LM. Remote code is needed when the config maps Auto classes to the checkpoint's own
    modelling files (``auto_map``), as LLaDA's and Dream's do."""
    from policies.model_kind import CAUSAL_LM, DIFFUSION_MODEL_TYPES, MASKED_DIFFUSION

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read {path / 'config.json'}: {exc}") from exc
    architectures = config.get("architectures") or []
    if "EagleHead" in architectures:
        return DRAFT_HEAD, False
    diffusion = (any(str(a).endswith("ForMaskedLM") for a in architectures)
                 or str(config.get("model_type", "")).lower() in DIFFUSION_MODEL_TYPES)
    return (MASKED_DIFFUSION if diffusion else CAUSAL_LM), bool(config.get("auto_map"))


def load_model(spec: str, device: torch.device | str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and its tokenizer in eval mode on `device` (default: CPU).

    A causal LM loads with ``AutoModelForCausalLM``; a masked-diffusion model with ``AutoModelForMaskedLM``
    (or ``AutoModel`` for remote-code LLaDA/Dream checkpoints), its mask token checked and recorded in
    ``config.mask_token_id``. Code shipped inside a checkpoint runs only with ``trust_remote_code=True``
    (the CLI's ``--trust-remote-code``): without it such a checkpoint is refused with a one-line message."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from policies.model_kind import MASKED_DIFFUSION

    hf_logging.disable_progress_bar()  # a CLI's stdout/stderr are for results, not weight-loading bars
    path = resolve_model_path(spec)
    kind, remote = checkpoint_kind(path)
    if kind == DRAFT_HEAD:
        raise ModelSpecError(f"{spec!r} is a draft head (EAGLE), not a model: a speculative policy names it in "
                             "techniques.speculative.eagle.head")
    if remote and not trust_remote_code:
        raise ModelSpecError(f"model {spec!r} ships its own modelling code (config.json auto_map); pass "
                             "--trust-remote-code to run it")
    torch_dtype = parse_dtype(dtype) or torch.float32
    target = torch.device(device) if device is not None else torch.device("cpu")
    if kind == MASKED_DIFFUSION:
        auto = AutoModel if remote else AutoModelForMaskedLM
    else:
        auto = AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"cannot load model {spec!r}: {first_line}") from exc
    if kind == MASKED_DIFFUSION:
        _record_mask_token(spec, model, tokenizer)
    model.to(target).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=spec, path=path, device=target)


def _record_mask_token(spec: str, model: Any, tokenizer: Any) -> None:
    """A denoiser needs a mask token: the config's, else the tokenizer's (BERT-style configs lack one)."""
    from policies.model_kind import DIFFUSION_MODEL_TYPES

    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        mask_id = DIFFUSION_MODEL_TYPES.get(str(getattr(model.config, "model_type", "")).lower())
    if mask_id is None:
        raise ModelSpecError(f"model {spec!r} is a masked LM without a mask token (neither its config nor its "
                             "tokenizer names one); it cannot be decoded by diffusion")
    model.config.mask_token_id = int(mask_id)
