"""Greedy tree speculative decoding is lossless: token for token the target's greedy output."""

from __future__ import annotations

import pytest
import torch

from policies.speculative import PromptLookupDrafter, SpeculativeStats, chain, speculative_generate
from tuner.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _generate(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=2)


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    draft = PromptLookupDrafter(k=3, max_ngram=2)
    assert draft([5, 6, 7, 8, 9, 5, 6]) == chain([7, 8, 9])
    assert draft([1, 2, 3]) == ([], [])


@pytest.mark.parametrize("prompt", ["copy: owl fox bear heron whale |", "cycle: red gold red gold red gold |",
                                    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"])
def test_output_equals_dense_greedy_and_drafts_get_accepted(tiny, prompt):
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    dense = _generate(tiny.model, ids, 24)
    stats = SpeculativeStats()
    spec = speculative_generate(tiny.model, ids, 24, PromptLookupDrafter(k=4), stats)
    assert spec.shape[1] == ids.shape[1] + 24
    assert torch.equal(spec[:, :dense.shape[1]], dense)  # dense may stop early at EOS
    assert stats.steps <= 24


def test_a_wrong_tree_still_gives_dense_output(tiny):
    ids = tiny.tokenizer("copy: 1 2 3 4 |", return_tensors="pt").input_ids
    dense = _generate(tiny.model, ids, 12)

    def bad_tree(context):  # two branches of junk plus one plausible token
        return [-1, -1, 0, 1], [7, 8, 9, context[-1]]

    spec = speculative_generate(tiny.model, ids, 12, bad_tree)
    assert torch.equal(spec[:, :dense.shape[1]], dense)
