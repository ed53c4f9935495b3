"""End to end: speculative *sampling* through the real decode loop has exactly the target's distribution.

The exact distribution of the first two generated tokens is computed from the target (p(x1) p(x2 | x1));
thousands of seeded speculative generations are compared with it by a chi-square test, for a draft-model
tree sampled without replacement and for deterministic prompt-lookup drafts. A decode loop that accepted
drafts without the rejection step fails the same test (checked, so the test can fail).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from policies import speculative
from policies.drafters import ModelDrafter, PromptLookupDrafter, Sampling
from policies.speculative import speculative_generate

VOCAB = 5
TRIALS = 2000


def _lm(seed: int, layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random logits a little so that drafts are sometimes right
        model.lm_head.weight.mul_(8)
    return model


def _exact_two_token_distribution(model, prompt: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        p1 = torch.softmax(model(prompt).logits[0, -1].double(), -1)
        rows = []
        for x1 in range(VOCAB):
            ids = torch.cat([prompt, torch.tensor([[x1]])], dim=1)
            rows.append(p1[x1] * torch.softmax(model(ids).logits[0, -1].double(), -1))
    return torch.stack(rows).flatten()


def _sample_counts(model, prompt, make_drafter, trials: int = TRIALS) -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB)
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        out = speculative_generate(model, prompt, 2, make_drafter(), sampling=Sampling(temperature=1.0),
                                   generator=generator)
        x1, x2 = out[0, -2:].tolist()
        counts[x1 * VOCAB + x2] += 1
    return counts


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5  # chi-square needs populated cells; pool the rest into one
    obs, exp = counts[keep], expected[keep]
    if (~keep).any():
        obs = torch.cat([obs, counts[~keep].sum()[None]])
        exp = torch.cat([exp, expected[~keep].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def target():
    return _lm(0, layers=2)


PROMPT = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])  # repeats, so that prompt lookup drafts


@pytest.mark.parametrize("drafter", ["draft_model_tree", "prompt_lookup"])
def test_speculative_sampling_matches_the_target_distribution(target, drafter):
    draft = _lm(1)
    if drafter == "draft_model_tree":
        def make():
            return ModelDrafter(draft, [-1, -1, 0, 0, 1])
    else:
        def make():
            return PromptLookupDrafter(depth=2, max_ngram=2, candidates=2)
    exact = _exact_two_token_distribution(target, PROMPT)
    counts = _sample_counts(target, PROMPT, make)
    assert _p_value(counts, exact) > 1e-3


def test_the_test_detects_a_lossy_acceptance_rule(target, monkeypatch):
    """Accepting every draft token the target gives any probability (no rejection sampling) is lossy."""
    def lossy(draft, rows, sampling, generator):
        from policies.spec_sampling import sampling_probs

        node = next((i for i, p in enumerate(draft.parents) if p == -1), None)
        bonus = int(torch.multinomial(sampling_probs(rows[0], 1.0), 1, generator=generator))
        return ([node], bonus) if node is not None else ([], bonus)

    monkeypatch.setattr(speculative, "_accept", lossy)
    exact = _exact_two_token_distribution(target, PROMPT)
    draft = _lm(1)
    counts = _sample_counts(target, PROMPT, lambda: ModelDrafter(draft, [-1, 0]), trials=500)
    assert _p_value(counts, exact) < 1e-6
