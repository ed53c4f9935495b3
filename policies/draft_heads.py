"""Feature-level draft heads (EAGLE, Li et al. 2024): a drafter that reads the target's own hidden states.

EAGLE-1's architecture, which EAGLE-2 keeps (it changes only the tree): from the target's last hidden state f_t
(after its final norm) at position t and the embedding of token t+1, one FC layer (2H -> H) and one decoder
layer of the target's own type predict f_{t+1}; the target's LM head turns that prediction into the draft
distribution of token t+2. Drafting feeds the head's own predictions back as features, over a tree. The decoder
layer has no input norm and the head no final norm (the feature it regresses is already normed), exactly as in
the published heads, so a checkpoint in EAGLE-1/2's layout loads as is:

    fc.weight (H, 2H), fc.bias (H; absent when the config says "bias": false)
    layers.0.self_attn.{q,k,v,o}_proj.weight (+ q/k/v biases for Qwen2-style targets)
    layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight
    embed_tokens.weight (optional: a frozen copy of the target's; the target's own is used)

`config.json` beside it holds the Llama-style fields (`hidden_size`, `intermediate_size`, heads, `rms_norm_eps`,
`rope_theta`, ...) and EAGLE's top-level `"bias"` (default true, as EAGLE's loader reads it). Weights load
from `model.safetensors` or `pytorch_model.bin` through `torch.load(weights_only=True)`, never plain pickles.

EAGLE-3's layout loads too (`Eagle3Head`): an FC over three target layers' hidden states (the inputs of layers
2, N//2 and N-3, concatenated low to high), one layer whose attention reads [norm(embedding), norm(feature)]
(2H wide), a final norm and its own LM head over a reduced vocabulary, `d2t` mapping draft ids to target ids
(target id = draft id + d2t[draft id]):

    fc.weight (H, 3H), midlayer.self_attn.{q,k,v}_proj.weight (.., 2H), midlayer.self_attn.o_proj.weight,
    midlayer.mlp.{gate,up,down}_proj.weight, midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
    norm.weight, lm_head.weight (Vd, H), d2t (Vd,) int64, t2d (V,) bool

A draft vocabulary (FR-Spec, Zhao et al. 2025, arXiv 2502.14856): the head may score only the `k` most frequent
tokens of its training text, with the target's LM-head rows for those tokens. SmolLM2's LM head is 49152 x 576
(113 MB in fp32), about a sixth of the target's bytes, so on a bandwidth-bound CPU it dominates a draft step.
The frequency ranking is stored with the head (`autotune.vocab_rank`, token ids most frequent first).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profilers.hf_compat import cache_arg

__all__ = ["Eagle3Head", "EagleHead", "HeadFormatError", "load_head", "save_head", "head_format"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
#: the token-frequency ranking of the head's training text (int64 token ids, most frequent first)
VOCAB_RANK_KEY = "autotune.vocab_rank"
#: EAGLE config fields that may differ from the target's (a head may have its own MLP width or heads)
_CONFIG_OVERRIDES = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                     "rope_theta", "hidden_act", "attention_bias", "mlp_bias")


class HeadFormatError(ValueError):
    """A draft-head checkpoint that cannot be loaded for this target; the message is one line."""


def head_backbone_config(target_config: Any, overrides: dict[str, Any] | None = None) -> Any:
    """The target's config cut to one decoder layer, with an unused 1-row embedding (the head embeds with the
    target's own table) and the head's own overrides."""
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = 1
    cfg.vocab_size = 1
    cfg.pad_token_id = None
    cfg.tie_word_embeddings = False
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:1]
    for key, value in (overrides or {}).items():
        if key == "qkv_bias":  # EAGLE's name for Qwen2-style attention biases
            key = "attention_bias"
        setattr(cfg, key, value)
    return cfg


class EagleHead(nn.Module):
    """FC over [embedding(token t+1), feature f_t] and one decoder layer: predicts the feature f_{t+1}.

    `forward` runs (1 or B, n) pairs through the layer, with a KV cache when drafting (tree masks and positions
    from the caller) and without one when training (causal)."""

    def __init__(self, target_config: Any, bias: bool = True, overrides: dict[str, Any] | None = None) -> None:
        from transformers import AutoModel

        super().__init__()
        hidden = int(target_config.hidden_size)
        self.config = head_backbone_config(target_config, overrides)
        self.bias = bool(bias)
        self.fc = nn.Linear(2 * hidden, hidden, bias=self.bias)
        self.backbone = AutoModel.from_config(self.config)
        self.backbone.layers[0].input_layernorm = nn.Identity()  # EAGLE's layer 0 has no input norm
        self.backbone.norm = nn.Identity()  # and the head no final norm: f is normed already
        self.vocab_rank: torch.Tensor | None = None

    #: target layers whose *inputs* are the features (None: the final norm's output)
    tap_layers: tuple[int, ...] | None = None

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, cache: Any = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc(torch.cat([embeds, features], dim=-1))
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs.update(cache_arg(self.backbone, cache))
        out = self.backbone(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.last_hidden_state

    # -- EAGLE-1/2 tensor names --------------------------------------------------------------------------------
    def eagle_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under EAGLE-1/2's names (no embedding: the target's is used)."""
        out = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        for key, value in self.backbone.state_dict().items():
            if key.startswith("layers."):
                out[key] = value
        return out

    def load_eagle_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        _copy_checked(self.eagle_state_dict(), tensors, source, "EAGLE-1/2")


class Eagle3Head(nn.Module):
    """EAGLE-3's head (see the module docstring): features of three target layers fused by `fc`, attention over
    [norm(embedding), norm(feature)], its own final norm and LM head over `d2t`'s draft vocabulary. Tree nodes
    feed back the layer's pre-norm output, which is already H wide (no `fc`)."""

    def __init__(self, target_config: Any, config: dict[str, Any]) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaMLP,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        super().__init__()
        hidden = int(config.get("hidden_size", target_config.hidden_size))
        heads = int(config.get("num_attention_heads", target_config.num_attention_heads))
        fields = {"hidden_size": hidden, "intermediate_size": int(config.get("intermediate_size",
                                                                              target_config.intermediate_size)),
                  "num_attention_heads": heads, "num_hidden_layers": 1, "vocab_size": 1,
                  "num_key_value_heads": int(config.get("num_key_value_heads", heads)),
                  "head_dim": int(config.get("head_dim") or hidden // heads),
                  "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
                  "rope_theta": float(config.get("rope_theta", 10000.0)),  # EAGLE-3's training used base 10000
                  "max_position_embeddings": int(config.get("max_position_embeddings", 2048)),
                  "hidden_act": config.get("hidden_act", "silu"), "attention_bias": False}
        self.config = LlamaConfig(**fields)
        self.config._attn_implementation = "sdpa"
        wide = LlamaConfig(**{**fields, "hidden_size": 2 * hidden})
        wide._attn_implementation = "sdpa"
        target_hidden = int(config.get("target_hidden_size") or target_config.hidden_size)
        n_layers = int(target_config.num_hidden_layers)
        self.tap_layers = (2, n_layers // 2, n_layers - 3)
        self.fc = nn.Linear(3 * target_hidden, hidden, bias=False)
        self.self_attn = LlamaAttention(wide, layer_idx=0)
        self.self_attn.o_proj = nn.Linear(heads * fields["head_dim"], hidden, bias=False)
        self.mlp = LlamaMLP(self.config)
        eps = fields["rms_norm_eps"]
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.rotary = LlamaRotaryEmbedding(self.config)
        draft_vocab = int(config.get("draft_vocab_size", target_config.vocab_size))
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.register_buffer("draft_to_target", torch.arange(draft_vocab), persistent=False)
        self.target_vocab = int(target_config.vocab_size)
        self.vocab_rank: torch.Tensor | None = None

    _MIDLAYER = ("self_attn", "mlp", "input_layernorm", "hidden_norm", "post_attention_layernorm")

    def eagle3_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under EAGLE-3's names (without d2t / t2d)."""
        out = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        for name in self._MIDLAYER:
            out.update({f"midlayer.{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        out.update({f"norm.{k}": v for k, v in self.norm.state_dict().items()})
        out.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        return out

    def load_eagle3_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        _copy_checked(self.eagle3_state_dict(), tensors, source, "EAGLE-3")
        d2t = tensors.get("d2t")
        if d2t is not None:
            ids = torch.arange(len(d2t)) + d2t.to(torch.long)
            if len(d2t) != self.lm_head.weight.shape[0] or int(ids.min()) < 0 or int(ids.max()) >= self.target_vocab:
                raise HeadFormatError(f"draft head {source}: d2t maps draft ids outside the target's vocabulary")
            self.draft_to_target = ids

    def scored_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, draft vocab) float logits; column j is target token `draft_to_target[j]`."""
        return self.lm_head(self.norm(hidden)).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, target vocab) float logits: the draft vocabulary's at their target ids, -inf elsewhere."""
        sub = self.scored_logits(hidden)
        out = torch.full((hidden.shape[0], self.target_vocab), -float("inf"), device=hidden.device)
        out[:, self.draft_to_target] = sub
        return out

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, cache: Any = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(features) if features.shape[-1] != embeds.shape[-1] else features
        n = h.shape[1]
        past = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=h.device)[None]
        if attention_mask is None:  # causal over the cache and the new rows
            attention_mask = torch.zeros(1, 1, n, past + n, dtype=h.dtype, device=h.device)
            attention_mask[..., past:] = torch.triu(torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype,
                                                               device=h.device), 1)
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(h)], dim=-1)
        kwargs = {} if cache is None else cache_arg(self.self_attn, cache)
        attn, _ = self.self_attn(hidden_states=x, position_embeddings=self.rotary(h, position_ids),
                                 attention_mask=attention_mask, **kwargs)
        out = h + attn
        return out + self.mlp(self.post_attention_layernorm(out))


def _copy_checked(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str, layout: str) -> None:
    """Copy `tensors` into `own` (the module's own state tensors), refusing missing names and wrong shapes."""
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise HeadFormatError(f"draft head {source}: tensor {missing[0]} missing ({len(missing)} in all) for an "
                              f"{layout} head of this target")
    for key, value in own.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise HeadFormatError(f"draft head {source}: {key} has shape {tuple(tensors[key].shape)}, this "
                                  f"target's head needs {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(tensors[key].to(value.dtype))


def head_format(tensors: dict[str, torch.Tensor]) -> str:
    """"eagle3" (EAGLE-3: `midlayer.*`), "eagle" (EAGLE-1/2: `fc.weight` and `layers.0.*`), else "unknown"."""
    if any(k.startswith("midlayer.") for k in tensors) or "d2t" in tensors:
        return "eagle3"
    if "fc.weight" in tensors and any(k.startswith("layers.0.") for k in tensors):
        return "eagle"
    return "unknown"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / SAFETENSORS_FILE))
    if (path / TORCH_FILE).is_file():
        try:  # weights only: a checkpoint is data, never code
            return torch.load(path / TORCH_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal is the same one-line error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HeadFormatError(f"draft head {path}: {TORCH_FILE} is not a plain tensor file ({first})") from None
    raise HeadFormatError(f"draft head {path}: neither {SAFETENSORS_FILE} nor {TORCH_FILE} found")


def load_head(path: str | Path, target: Any) -> EagleHead | Eagle3Head:
    """The EAGLE-1/2 or EAGLE-3 head in directory `path` for `target` (on its device and in its dtype), in eval
    mode."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise HeadFormatError(f"draft head {path}: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HeadFormatError(f"draft head {path}: {CONFIG_FILE} is not JSON ({exc})") from None
    tensors = _read_tensors(path)
    kind = head_format(tensors)
    weight = next(target.parameters())
    if kind == "eagle3":
        head3 = Eagle3Head(target.config, config)
        head3.load_eagle3_state_dict(tensors, str(path))
        if int(target.config.num_hidden_layers) < 4:
            raise HeadFormatError(f"draft head {path}: an EAGLE-3 head reads layers 2, N/2 and N-3; the target has "
                                  f"only {target.config.num_hidden_layers}")
        return head3.to(device=weight.device, dtype=weight.dtype).eval()
    if kind != "eagle":
        raise HeadFormatError(f"draft head {path}: not an EAGLE head (no fc.weight and layers.0.* tensors)")
    hidden = int(target.config.hidden_size)
    if int(config.get("hidden_size", hidden)) != hidden:
        raise HeadFormatError(f"draft head {path}: hidden_size {config['hidden_size']} is not the target's {hidden}")
    overrides = {k: config[k] for k in (*_CONFIG_OVERRIDES, "qkv_bias") if k in config}
    head = EagleHead(target.config, bias=bool(config.get("bias", True)), overrides=overrides)
    head.load_eagle_state_dict(tensors, str(path))
    rank = tensors.get(VOCAB_RANK_KEY)
    vocab = int(target.config.vocab_size)
    if rank is not None:
        rank = rank.to(torch.long)
        if rank.ndim != 1 or int(rank.max()) >= vocab or int(rank.min()) < 0:
            raise HeadFormatError(f"draft head {path}: {VOCAB_RANK_KEY} holds ids outside the target's vocabulary "
                                  f"of {vocab}")
    head = head.to(device=weight.device, dtype=weight.dtype).eval()
    head.vocab_rank = None if rank is None else rank.to(weight.device)
    return head


def save_head(head: EagleHead, path: str | Path, target_config: Any, metadata: dict[str, Any] | None = None,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `head` in EAGLE-1/2's layout (config.json, model.safetensors in `dtype`) plus its vocabulary ranking
    and `metadata` (safetensors header strings); each file is written to a temporary name and renamed."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = head.config
    config = {"model_type": getattr(target_config, "model_type", "llama"), "architectures": ["EagleHead"],
              "bias": head.bias, "hidden_size": int(target_config.hidden_size), "num_hidden_layers": 1,
              "vocab_size": int(target_config.vocab_size),
              **{k: getattr(cfg, k) for k in _CONFIG_OVERRIDES if getattr(cfg, k, None) is not None}}
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.eagle_state_dict().items()}
    if head.vocab_rank is not None:
        tensors[VOCAB_RANK_KEY] = head.vocab_rank.detach().to("cpu", torch.long).contiguous()
    tmp = path / f".{SAFETENSORS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path / SAFETENSORS_FILE)
    tmp_config = path / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, path / CONFIG_FILE)


@dataclass
class DraftVocabulary:
    """Scores only the `size` most frequent tokens (FR-Spec) with the target LM head's rows for them; `size`
    None scores every token with the LM head itself."""

    lm_head: nn.Module
    ids: torch.Tensor | None = None  # the scored token ids (None: all)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def build(cls, lm_head: nn.Module, rank: torch.Tensor | None, size: int | None) -> DraftVocabulary:
        vocab = int(lm_head.weight.shape[0])
        if size is None or size >= vocab:
            return cls(lm_head)
        if rank is None:
            raise HeadFormatError("the draft head has no token-frequency ranking, so it cannot score a reduced "
                                  "vocabulary (set vocab: null)")
        ids = rank[: int(size)]
        bias = getattr(lm_head, "bias", None)
        return cls(lm_head, ids, lm_head.weight.detach()[ids].contiguous(),
                   None if bias is None else bias.detach()[ids].contiguous())

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    def scored_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, size) float logits of the scored tokens only; column j is token `ids[j]` (every token in id order
        when `ids` is None)."""
        if self.ids is None:
            return self.lm_head(hidden).float()
        return torch.nn.functional.linear(hidden, self.weight, self.bias).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, vocab) float logits of `hidden` (n, H): -inf for tokens outside the draft vocabulary."""
        if self.ids is None:
            return self.lm_head(hidden).float()
        sub = self.scored_logits(hidden)
        out = torch.full((hidden.shape[0], self.vocab_size), -float("inf"), device=hidden.device)
        out[:, self.ids] = sub
        return out
