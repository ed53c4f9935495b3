"""The transformers compatibility seam (profilers.hf_compat): the one module that spells the cache keyword.

These run on whichever transformers is installed; CI runs them on the lock (the newest supported release) and
on the oldest supported release."""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel

from policies import apply_policy, model_fingerprint
from policies.testing import make_policy_dict
from profilers import hf_compat
from profilers.hf_compat import cache_arg, cache_kwarg, hook_cache, output_cache

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policies", "profilers", "tuner", "search_spaces", "reports", "benchmarks")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_the_keyword_is_the_one_the_installed_forward_declares():
    import inspect

    params = inspect.signature(LlamaModel.forward).parameters
    want = "cache" if "cache" in params else "past_key_values"
    model = _tiny_llama()
    assert cache_kwarg(model) == want
    assert cache_kwarg(model.model) == want
    assert cache_kwarg(model.model.layers[0]) == want
    assert cache_arg(model, "kv") == {want: "kv"}


def test_remote_code_spelling_is_read_off_the_signature():
    class OldStyle(torch.nn.Module):  # a remote-code model written against transformers <= 5.23
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    class Opaque(torch.nn.Module):  # names neither: the installed release's own name
        def forward(self, *args, **kwargs):
            return kwargs

    assert cache_kwarg(OldStyle()) == "past_key_values"
    assert cache_kwarg(Opaque()) == hf_compat._installed_default()


def test_hook_cache_reads_either_spelling():
    kv = DynamicCache()  # empty: falsy by len(), must still be found
    assert hook_cache({"past_key_values": kv}) is kv
    assert hook_cache({"cache": kv, "use_cache": True}) is kv
    assert hook_cache({"use_cache": True}) is None


def test_wrappers_are_looked_through():
    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    class Compiled(torch.nn.Module):  # the shape of torch.compile's OptimizedModule: forward(*args, **kwargs)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    assert cache_kwarg(Compiled(OldStyle())) == "past_key_values"
    assert cache_kwarg(Compiled(_tiny_llama())) == cache_kwarg(_tiny_llama())


def test_calls_through_the_seam_are_silent_and_the_output_cache_is_found(caplog):
    once = getattr(logging.Logger, "warning_once", None)  # transformers logs each deprecation once per process
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    model = _tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    cache = hf_compat.new_dynamic_cache(model.config)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        with torch.inference_mode():
            out = model(ids, **cache_arg(model, cache), use_cache=True)
            assert output_cache(out) is cache
            step = model(ids[:, -1:], **cache_arg(model, output_cache(out)), use_cache=True)
    assert output_cache(step).get_seq_length() == 6
    # An output without a cache (a masked LM, or use_cache=False) is None, not a deprecation line.
    from transformers.modeling_outputs import MaskedLMOutput

    with caplog.at_level(logging.WARNING):
        assert output_cache(MaskedLMOutput(logits=torch.zeros(1, 2, 3))) is None
        assert output_cache(model(ids, use_cache=False)) is None
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert output_cache(object()) is None


# What a caller may write on the installed release: the old name always (deprecated from 5.24, not gone); the
# new one where the release has it (before 5.24 ``cache=`` would vanish into ``**kwargs``).
SPELLINGS = sorted({"past_key_values", hf_compat._installed_default()})


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_token_retention_decode_is_right_whatever_the_caller_spells(spelling):
    """A user's own decode loop may pass the cache under any name the release accepts: the hooks must see it,
    or pruned layers get masks of the wrong width."""
    model = _tiny_llama(1)
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 80))
    section = {"keep": [1.0, 1.0, 0.5, 0.25], "scorer": "attention", "window": 4, "sinks": 2,
               "min_prompt_tokens": 16}
    policy = make_policy_dict(model_fingerprint(model), techniques={"token_retention": section})
    with apply_policy(model, policy) as tuned, torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old spelling is deprecated on >= 5.24, on purpose
        cache = hf_compat.new_dynamic_cache(model.config)
        out = tuned(ids, **{spelling: cache}, use_cache=True)
        lengths = [cache.get_seq_length(i) for i in range(4)]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, **{spelling: cache}, use_cache=True).logits[0, -1]
        reference = tuned.generate(ids, max_new_tokens=2, do_sample=False)
    assert lengths == [80, 80, 40, 20]
    assert int(step.argmax()) == int(reference[0, -1])


MODEL_CALLEES = {"model", "lm", "target", "draft", "forward", "base", "backbone"}  # what a forward is called by
OUTPUT_NAMES = {"out", "output", "outputs", "result", "prefill", "step"}  # what its result is called
KWARGS_NAMES = {"kwargs", "kw", "model_kwargs", "bound", "extra"}  # what a hook's keyword arguments are called


def _last_name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _code_spellings(path: Path) -> list[str]:
    """Places in ``path`` that spell the cache keyword in code (docstrings and comments aside): the old name
    anywhere; the new one where it is a model's keyword (``model(..., cache=...)``), an output's attribute
    (``out.cache``) or a hook's keyword argument (``kwargs["cache"]``, ``kwargs.get("cache")``). The diffusion
    policy's own ``cache`` field (``cfg.cache``, ``section["cache"]``) is another thing and passes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    hits = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if name == "cache" and _last_name(node.value) in OUTPUT_NAMES:
                hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, (ast.keyword, ast.arg)):
            name = node.arg
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            name = node.value
        elif isinstance(node, ast.Call):
            if _last_name(node.func) in MODEL_CALLEES and any(k.arg == "cache" for k in node.keywords):
                hits.append(f"{where}:{node.lineno} {ast.unparse(node.func)}(cache=...)")
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args
                    and _last_name(node.func.value) in KWARGS_NAMES and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "cache"):
                hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
        if (isinstance(node, ast.Subscript) and _last_name(node.value) in KWARGS_NAMES
                and isinstance(node.slice, ast.Constant) and node.slice.value == "cache"):
            hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
        if name == "past_key_values":
            hits.append(f"{where}:{node.lineno} past_key_values")
    return hits


def test_the_spelling_scan_finds_each_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(model, kwargs, out, cfg):\n"
                      "    model(1, cache=2)\n"
                      "    kwargs['cache']\n"
                      "    kwargs.get('cache')\n"
                      "    out.cache\n"
                      "    model(1, past_key_values=2)\n"
                      "    cfg.cache\n"
                      "    make_config(cache='prefix')\n")
    hits = [h.split(" ", 1)[0].rsplit(":", 1)[1] for h in _code_spellings(sample)]
    assert sorted(hits) == ["2", "3", "4", "5", "6"]


def test_no_module_but_the_seam_spells_the_cache_keyword():
    seam = ROOT / "profilers" / "hf_compat.py"
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p != seam]
    assert files
    hits = [hit for p in files for hit in _code_spellings(p)]
    assert hits == [], f"spell the cache keyword through profilers.hf_compat: {hits}"
