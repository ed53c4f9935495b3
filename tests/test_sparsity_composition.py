"""Sparsity composed with the other techniques in one policy: weight sparsity, activation sparsity (with a
sparse kernel), token retention and speculative decoding, applied through `apply_policy` on `builtin:tiny`.

Speculative decoding is lossless relative to the model it verifies with, so with every other technique applied
its greedy output must equal the greedy output of the same policy without it. A sparse kernel on the decode
rows must decode like plain masking. Closing the handle must give back the dense model bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from policies import apply_policy, model_fingerprint
from policies.sparsity import GROUPS, calibrate_thresholds
from policies.testing import make_policy_dict
from tuner.models import load_model
from tuner.tasks import code_samples, get_task

N_NEW = 16
KEEP = {"keep": [1.0, 1.0, 0.75, 0.75, 0.5, 0.5]}
SPECULATIVE = {"drafter": "prompt_lookup", "prompt_lookup": {"depth": 4, "candidates": 2}}
WEIGHTS = {"method": "magnitude", "levels": [[0.2] * len(GROUPS)] * 6}


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


@pytest.fixture(scope="module")
def activation_section(tiny):
    batches = [tiny.tokenizer(t, return_tensors="pt").input_ids for t in code_samples(2, seed=5, n_chars=1000)]
    levels = [[0.2, 0.2, 0.2, 0.5]] * 6
    thresholds = calibrate_thresholds(tiny.model, batches, [dict(zip(GROUPS, row, strict=True)) for row in levels])
    return {"method": "teal", "levels": levels,
            "thresholds": [[round(t.get(g, 0.0), 6) for g in GROUPS] for t in thresholds]}


def _policy(model, **techniques):
    return make_policy_dict(model_fingerprint(model), techniques=techniques)


def _greedy(model, policy, ids):
    with torch.inference_mode(), apply_policy(model, policy) as handle:
        return handle.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                               attention_mask=torch.ones_like(ids), pad_token_id=0)


def test_speculative_decoding_is_lossless_on_a_sparsified_pruned_model(tiny, activation_section):
    model = tiny.model
    ids = tiny.tokenizer(get_task("pattern").examples(1, seed=3)[0].prompt, return_tensors="pt").input_ids
    others = {"weight_sparsity": WEIGHTS, "sparsity": activation_section, "token_retention": KEEP}
    without = _greedy(model, _policy(model, **others), ids)
    with_spec = _greedy(model, _policy(model, **others, speculative=SPECULATIVE), ids)
    assert torch.equal(with_spec, without)


def test_a_sparse_kernel_among_the_techniques_decodes_like_masking_and_dense_comes_back_bit_for_bit(
        tiny, activation_section):
    model = tiny.model
    ids = tiny.tokenizer(get_task("pattern").examples(1, seed=4)[0].prompt, return_tensors="pt").input_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        dense_logits = model(ids).logits
    section = {**activation_section, "kernels": [["dense", "dense", "dense", "csr_mv"]] * 6}
    masked = _greedy(model, _policy(model, weight_sparsity=WEIGHTS, sparsity=activation_section,
                                    token_retention=KEEP), ids)
    kernel = _greedy(model, _policy(model, weight_sparsity=WEIGHTS, sparsity=section, token_retention=KEEP), ids)
    assert torch.equal(kernel, masked)  # csr_mv on the decode rows equals masking within 1e-4: same argmaxes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, dense_logits)
    assert not any(lin._forward_pre_hooks for lin in model.modules() if isinstance(lin, torch.nn.Linear))
    assert not any("forward" in lin.__dict__ for lin in model.modules() if isinstance(lin, torch.nn.Linear))
