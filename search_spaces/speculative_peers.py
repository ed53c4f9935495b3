"""Peers of the `speculative` technique: Hugging Face transformers' own speculative decoders.

`autotune bench` times them beside a speculative policy, on the dense model, with the same prompt, repeats
and quality harness, so the policy's tree decoding is compared with what a user gets from the library:

- `hf-assisted`: assisted generation (`model.generate(..., assistant_model=DRAFT)`) with the policy's draft
  model (`section["draft_model"]`; the speculative search space fills in the draft known for the target;
  no draft, no `hf-assisted`) and the library's assistant defaults (in
  transformers 5: `num_assistant_tokens=20`, schedule `"constant"`, `assistant_confidence_threshold=0.4`;
  the installed version's values are recorded in the peer's `source`);
- `hf-prompt-lookup`: prompt lookup decoding (`prompt_lookup_num_tokens=10`, the documented default, and
  the library's `max_matching_ngram_size`, 2 when unset).

Both run greedy, so their output is the target's greedy output (assisted decoding is lossless up to
floating-point ties between a multi-token verify forward and one-token decode steps).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from search_spaces.base import Peer

PROMPT_LOOKUP_NUM_TOKENS = 10  # transformers' documented default for prompt lookup decoding

__all__ = ["PROMPT_LOOKUP_NUM_TOKENS", "hf_speculative_peers"]


def _pad_token_id(model: Any) -> int:
    """The pad id to pass to generate (silences HF's warning): the model's pad, else its first EOS, else 0."""
    for config in (getattr(model, "generation_config", None), model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


# transformers >= 5.24 calls the assistant's `generate` itself with its own `generation_config` *and*
# `max_new_tokens`/`min_new_tokens` (`AssistedCandidateGenerator._prepare_generation_args`), then warns, once,
# that passing both is deprecated: a notice about the library's internal call, which no argument of ours changes.
_HF_INTERNAL_NOTICE = "Passing `generation_config` together with generation-related arguments"


class _DropHFInternalNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _HF_INTERNAL_NOTICE not in record.getMessage()


def _silence_assistant_notice() -> None:
    """Drop exactly that notice (and nothing else) from transformers' generation logger; idempotent."""
    hf_logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, _DropHFInternalNotice) for f in hf_logger.filters):
        hf_logger.addFilter(_DropHFInternalNotice())


def _eos_ids(model: Any) -> list[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _greedy_generate(model: Any, **fixed: Any) -> Any:
    """`generate(input_ids, **kw)`: `model.generate` greedy with a full attention mask, plus `fixed` kwargs.

    With an assistant, "exactly n new tokens" (`min_new_tokens == max_new_tokens`, how every variant is timed)
    is asked as an EOS-suppressing logits processor instead: transformers hands the main call's processors
    *and* a `min_new_tokens` to the assistant's own `generate`, which then builds a second min-length
    processor and warns about the duplicate. Suppressing EOS at every step is the same constraint."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    pad_token_id = _pad_token_id(model)
    assisted = "assistant_model" in fixed
    if assisted:
        _silence_assistant_notice()
    eos = _eos_ids(model)

    def generate(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        defaults = {"do_sample": False, "attention_mask": torch.ones_like(input_ids), "pad_token_id": pad_token_id}
        if assisted and eos and kwargs.get("min_new_tokens") is not None \
                and kwargs["min_new_tokens"] >= kwargs.get("max_new_tokens", 0) > 0:
            kwargs = {k: v for k, v in kwargs.items() if k != "min_new_tokens"}
            suppress = SuppressTokensLogitsProcessor(eos, device=input_ids.device)
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), suppress])
        return model.generate(input_ids, **{**defaults, **kwargs, **fixed})

    return generate


def _assistant_settings(draft: Any) -> str:
    """The assistant settings transformers will use for `draft` (its generation config over library defaults)."""
    config = copy.deepcopy(draft.generation_config)
    defaults = getattr(config, "_get_default_generation_params", None)
    if callable(defaults):
        config.update(**defaults(), defaults_only=True)
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return ", ".join(f"{name}={getattr(config, name, None)}" for name in names)


def hf_speculative_peers(model: Any, section: dict[str, Any], draft_model: Any = None) -> list[Peer]:
    """`hf-assisted` (with the section's draft model, or `draft_model` when given) and `hf-prompt-lookup`.

    Each peer's `generate(input_ids, max_new_tokens=..., min_new_tokens=..., **kw)` runs `model.generate`
    greedy (`do_sample=False` unless passed) with an all-ones attention mask and a pad token id."""
    import transformers

    version = f"transformers {transformers.__version__}"
    peers = []
    found: tuple[str, Any] | None = None
    if draft_model is not None:
        found = (type(draft_model).__name__, draft_model)
    elif section.get("draft_model"):  # must load and share the target's vocabulary (ValueError otherwise)
        from policies.speculative import draft_for

        found = (section["draft_model"], draft_for(section["draft_model"], model))
    if found is not None:
        spec, draft = found
        peers.append(Peer("hf-assisted", _greedy_generate(model, assistant_model=draft),
                          f"{version} assisted generation, draft {spec}, library defaults "
                          f"({_assistant_settings(draft)})"))
    ngram = getattr(model.generation_config, "max_matching_ngram_size", None) or 2
    peers.append(Peer("hf-prompt-lookup", _greedy_generate(model, prompt_lookup_num_tokens=PROMPT_LOOKUP_NUM_TOKENS),
                      f"{version} prompt lookup decoding (prompt_lookup_num_tokens={PROMPT_LOOKUP_NUM_TOKENS}, "
                      f"max_matching_ngram_size={ngram})"))
    return peers
