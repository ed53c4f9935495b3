"""Speculative sampling over a token tree emits exactly the target's distribution (and the checks can fail)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

from policies import spec_sampling
from policies.spec_sampling import (
    accept_sampling,
    one_hot_rows,
    residual,
    sampling_probs,
    without_replacement_rows,
)
from policies.tree_attention import accept_greedy

V = 6
# Three root children (nodes 0, 1, 2); node 0 has two children (3, 4), node 1 one (5).
PARENTS = [-1, -1, -1, 0, 0, 1]
ONE_HOT_TOKENS = [2, 0, 5, 1, 3, 4]  # deterministic proposals, distinct among siblings
LOOKUP_TOKEN = 3  # the mixed tree's deterministic first root child (a prompt-lookup style guess)
N_TRIALS = 20_000
N_WRONG_TRIALS = 5_000  # a wrong algorithm is far off: fewer trials already reject it overwhelmingly


# -- a consistent toy target and draft ---------------------------------------------------------------------------
# The target is an order-1 Markov chain: `root` after the verified context, then T[x] after token x. So the
# target's distribution after node i is T[tokens[i]], and the true joint of the next two tokens is
# root[x1] * T[x1, x2]. The draft is another Markov chain (q0, Q), deliberately different and peaked, as
# draft models are (which also makes renormalising after draws without replacement matter).
def _world(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "root": torch.softmax(torch.randn(V, generator=g), -1),
        "T": torch.softmax(torch.randn(V, V, generator=g), -1),
        "q0": torch.softmax(2.5 * torch.randn(V, generator=g), -1),
        "Q": torch.softmax(2.5 * torch.randn(V, V, generator=g), -1),
    }


def _draw_without_replacement(base: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k sequential draws per trial row of `base` (N, V), each from what is left: tokens (N, k) and the rows
    (N, k, V) each token was actually drawn from (earlier draws zeroed, renormalised)."""
    left = base.clone()
    tokens, rows = [], []
    for _ in range(k):
        row = left / left.sum(-1, keepdim=True)
        x = torch.multinomial(row, 1, generator=g).squeeze(1)
        tokens.append(x)
        rows.append(row)
        left = left.scatter(1, x[:, None], 0.0)
    return torch.stack(tokens, 1), torch.stack(rows, 1)


def _trees(kind: str, world: dict[str, torch.Tensor], n: int, g: torch.Generator):
    """Per-trial draft trees over PARENTS: tokens (n, 6) and q rows (n, 6, V), or None (all one-hot)."""
    if kind == "one_hot":
        return torch.tensor(ONE_HOT_TOKENS).expand(n, -1), None
    q0 = world["q0"].expand(n, -1)
    if kind == "without_replacement":
        top, top_rows = _draw_without_replacement(q0, 3, g)
        kids0, kids0_rows = _draw_without_replacement(world["Q"][top[:, 0]], 2, g)
        kid1, kid1_rows = _draw_without_replacement(world["Q"][top[:, 1]], 1, g)
    else:  # mixed: a deterministic guess first, then draft draws without it; a greedy child under node 1
        lookup = torch.full((n, 1), LOOKUP_TOKEN)
        rest, rest_rows = _draw_without_replacement(q0.scatter(1, lookup, 0.0), 2, g)
        top = torch.cat([lookup, rest], 1)
        top_rows = torch.cat([one_hot_rows(lookup, V), rest_rows], 1)
        kids0, kids0_rows = _draw_without_replacement(world["Q"][top[:, 0]], 2, g)
        kid1 = world["Q"][top[:, 1]].argmax(-1, keepdim=True)
        kid1_rows = one_hot_rows(kid1, V)
    return torch.cat([top, kids0, kid1], 1), torch.cat([top_rows, kids0_rows, kid1_rows], 1)


def _first_two_tokens(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    """(n, 2) first two emitted tokens over n independent verification steps."""
    world = _world()
    g = torch.Generator().manual_seed(seed)
    tokens, rows = _trees(kind, world, n, g)
    tree_probs = world["T"][tokens]
    # When the first token is the sampled one (nothing accepted), the second comes from the next step:
    # the target's distribution after it, drawn ahead of time for every possible first token.
    next_step = torch.multinomial(world["T"], n, replacement=True, generator=g)  # (V, n)
    out = torch.empty(n, 2, dtype=torch.long)
    for t in range(n):
        accepted, bonus = accept_sampling(PARENTS, tokens[t], world["root"], tree_probs[t],
                                          None if rows is None else rows[t], generator=g)
        emitted = [int(tokens[t, a]) for a in accepted] + [bonus]
        out[t, 0] = emitted[0]
        out[t, 1] = emitted[1] if len(emitted) > 1 else next_step[emitted[0], t]
    return out


def _p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected fewer than 5 times are pooled into one."""
    observed, expected = observed.double().flatten(), probs.double().flatten() * float(observed.sum())
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def _p_values(pairs: torch.Tensor) -> tuple[float, float]:
    """p-values of the first token against root, and of the first two tokens against root[x1] * T[x1, x2]."""
    world = _world()
    first = torch.bincount(pairs[:, 0], minlength=V)
    joint = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V)
    return _p_value(first, world["root"]), _p_value(joint, world["root"][:, None] * world["T"])


KINDS = ["one_hot", "without_replacement", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_emitted_tokens_follow_the_target_distribution(kind: str) -> None:
    p_first, p_joint = _p_values(_first_two_tokens(kind, N_TRIALS))
    assert p_first > 1e-3, f"first token deviates from the target (p={p_first:.2e})"
    assert p_joint > 1e-3, f"first two tokens deviate from the target (p={p_joint:.2e})"


def _keep_p(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    return p  # the classic bug: try the next sibling against p instead of the residual


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_check_rejects_verification_without_the_residual(kind: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_sampling, "_after_rejection", _keep_p)
    assert min(_p_values(_first_two_tokens(kind, N_WRONG_TRIALS))) < 1e-6


def test_the_same_check_rejects_plain_draft_rows_for_draws_without_replacement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's side of the contract: rows must be what each sibling was drawn from. Passing the plain
    draft distribution for without-replacement siblings (earlier tokens not removed) is biased."""
    real = spec_sampling.accept_sampling

    def with_plain_rows(parents, tokens, root_probs, tree_probs, draft_probs=None, generator=None):
        plain = draft_probs.clone()
        for i, p in enumerate(parents):
            plain[i] = plain[next(j for j, pj in enumerate(parents) if pj == p)]  # first sibling's row
        return real(parents, tokens, root_probs, tree_probs, plain, generator=generator)

    monkeypatch.setitem(globals(), "accept_sampling", with_plain_rows)
    assert min(_p_values(_first_two_tokens("without_replacement", N_WRONG_TRIALS))) < 1e-6


# -- certain acceptance, greedy limit, determinism ---------------------------------------------------------------
def _chain_drawn_from_target(world: dict[str, torch.Tensor], depth: int, g: torch.Generator):
    tokens, rows = [], []
    p = world["root"]
    for _ in range(depth):
        tokens.append(int(torch.multinomial(p, 1, generator=g)))
        rows.append(p)
        p = world["T"][tokens[-1]]
    return torch.tensor(tokens), torch.stack(rows)


def test_draft_rows_equal_to_the_target_are_always_accepted() -> None:
    world = _world(3)
    g = torch.Generator().manual_seed(3)
    parents = [-1, 0, 1, 2]
    for _ in range(200):
        tokens, rows = _chain_drawn_from_target(world, len(parents), g)
        accepted, bonus = accept_sampling(parents, tokens, world["root"], world["T"][tokens], rows, generator=g)
        assert accepted == [0, 1, 2, 3]
        assert 0 <= bonus < V


def test_first_sibling_drawn_from_the_target_is_accepted_before_later_siblings() -> None:
    world = _world(4)
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        first = int(torch.multinomial(world["root"], 1, generator=g))
        tokens = torch.tensor([first, (first + 1) % V])
        rows = torch.stack([world["root"], one_hot_rows(torch.tensor((first + 1) % V), V)])
        accepted, _ = accept_sampling([-1, -1], tokens, world["root"], world["T"][tokens], rows, generator=g)
        assert accepted == [0]


def test_a_token_its_draft_row_gives_no_mass_is_rejected() -> None:
    target = one_hot_rows(torch.tensor(2), V)
    q = torch.full((1, V), 0.2).index_fill(1, torch.tensor([2]), 0.0)
    accepted, bonus = accept_sampling([-1], torch.tensor([2]), target, target[None], q)
    assert accepted == [] and bonus == 2  # rejected; the residual of a point mass is that point mass


@pytest.mark.parametrize("with_rows", [False, True])
def test_temperature_zero_matches_greedy_verification(with_rows: bool) -> None:
    g = torch.Generator().manual_seed(5)
    parents = [-1, -1, 0, 0, 1, 2, 2, 5]
    for _ in range(100):
        logits = torch.randn(len(parents) + 1, V, generator=g)
        probs = sampling_probs(logits, temperature=0.0)
        # Mostly the target's argmax after the parent, so that paths of several nodes get accepted.
        wanted = logits[torch.tensor(parents) + 1].argmax(-1)
        tokens = torch.where(torch.rand(len(parents), generator=g) < 0.6, wanted,
                             torch.randint(V, (len(parents),), generator=g))
        rows = None
        if with_rows:
            if len(set(zip(parents, tokens.tolist(), strict=True))) < len(parents):
                continue  # a repeated sibling token cannot be a draw without replacement
            rows = without_replacement_rows(parents, tokens, torch.softmax(torch.randn(len(parents), V), -1))
        got = accept_sampling(parents, tokens, probs[0], probs[1:], rows, generator=g)
        assert got == accept_greedy(parents, tokens, logits[0], logits[1:])


def test_seeded_generator_is_deterministic_and_none_means_one_hot_rows() -> None:
    world = _world(6)
    tokens = torch.tensor(ONE_HOT_TOKENS)
    runs = []
    for rows in (None, one_hot_rows(tokens, V), None):
        g = torch.Generator().manual_seed(11)
        runs.append([accept_sampling(PARENTS, tokens, world["root"], world["T"][tokens], rows, generator=g)
                     for _ in range(50)])
    assert runs[0] == runs[1] == runs[2]


def test_empty_tree_samples_from_the_root() -> None:
    g = torch.Generator().manual_seed(0)
    root = one_hot_rows(torch.tensor(4), V)
    assert accept_sampling([], torch.empty(0, dtype=torch.long), root, torch.empty(0, V), generator=g) == ([], 4)


# -- helpers -----------------------------------------------------------------------------------------------------
def test_residual_is_the_normalised_positive_part_and_falls_back_to_p() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.4, 0.2, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p), p)  # no mass left: acceptance was certain, keep p
    batch = residual(torch.stack([p, q]), torch.stack([q, p]))
    assert torch.allclose(batch.sum(-1), torch.ones(2))
    assert torch.allclose(batch[1], torch.tensor([0.0, 1 / 3, 0.0, 2 / 3]))


def test_without_replacement_rows_remove_earlier_siblings() -> None:
    base = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    rows = without_replacement_rows([-1, -1, -1, 0], torch.tensor([0, 2, 1, 1]), base)
    assert torch.allclose(rows, torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0],
                                              [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"base_probs\[1\]: no mass left"):
        without_replacement_rows([-1, -1], torch.tensor([1, 1]), one_hot_rows(torch.tensor([1, 1]), 3))


def test_sampling_probs_limits_and_nucleus() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 3, 50, generator=g) * 3
    top = logits.argmax(-1)
    for temperature in (0.0, 1e-6):
        assert torch.equal(sampling_probs(logits, temperature), one_hot_rows(top, 50))
    assert torch.allclose(sampling_probs(logits, 0.7, top_p=1.0), torch.softmax(logits / 0.7, -1), atol=1e-6)
    assert torch.equal(sampling_probs(logits, 1.3, top_p=1e-6), one_hot_rows(top, 50))
    nucleus = sampling_probs(logits, 1.0, top_p=0.9)
    assert nucleus.dtype == torch.float32
    assert torch.allclose(nucleus.sum(-1), torch.ones(4, 3))
    full = torch.softmax(logits, -1)
    kept = nucleus > 0
    # Smallest nucleus: what it keeps reaches 0.9, and dropping its least likely token would not.
    assert ((full * kept).sum(-1) >= 0.9 - 1e-6).all()
    least = torch.where(kept, full, torch.inf).amin(-1)
    assert ((full * kept).sum(-1) - least < 0.9).all()
    assert sampling_probs(logits.bfloat16(), 1.0).dtype == torch.float32


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.9), (0.6, 0.5), (1.7, 0.95), (0.8, 0.0)])
def test_sampling_probs_matches_hugging_face_warpers(temperature: float, top_p: float) -> None:
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(8)) * 2
    warped = logits_process.TemperatureLogitsWarper(temperature)(None, scores.clone())
    warped = logits_process.TopPLogitsWarper(top_p)(None, warped)
    assert torch.allclose(sampling_probs(scores, temperature, top_p), torch.softmax(warped, -1), atol=1e-6)


# -- bad inputs --------------------------------------------------------------------------------------------------
def _call(parents=(-1, -1, 0), tokens=(1, 2, 3), vocab=V, tree_rows=None, draft=None):
    root = torch.full((vocab,), 1 / vocab)
    n = len(parents)
    tree = torch.full((n if tree_rows is None else tree_rows, vocab), 1 / vocab)
    return lambda: accept_sampling(list(parents), torch.tensor(tokens), root, tree, draft)


BAD: list[tuple[str, Callable[[], object], str]] = [
    ("parent after child", _call(parents=(-1, 2, 0)), r"parents\[1\]: parent 2 must be -1 .* earlier node"),
    ("parent below -1", _call(parents=(-1, -2, 0)), r"parents\[1\]"),
    ("tokens length", _call(tokens=(1, 2)), r"tokens: shape must be \(3,\)"),
    ("token outside vocab", _call(tokens=(1, 2, V)), r"tokens\[2\]: id 6 outside the vocabulary"),
    ("float tokens", _call(tokens=(1.0, 2.0, 3.0)), r"tokens: must be an integer tensor"),
    ("tree_probs rows", _call(tree_rows=2), r"tree_probs: shape must be \(3, 6\)"),
    ("draft_probs vocab", _call(draft=torch.full((3, V + 1), 0.1)), r"draft_probs: shape must be \(3, 6\)"),
    ("root_probs 2-D", lambda: accept_sampling([-1], torch.tensor([0]), torch.ones(1, V) / V, torch.ones(1, V) / V),
     r"root_probs: must be a 1-D"),
    ("negative temperature", lambda: sampling_probs(torch.zeros(V), -0.5), r"temperature: must be a number >= 0"),
    ("top_p above 1", lambda: sampling_probs(torch.zeros(V), 1.0, top_p=1.5), r"top_p: must be in \[0, 1\]"),
    ("integer logits", lambda: sampling_probs(torch.zeros(V, dtype=torch.long), 1.0), r"logits: must be"),
    ("no mass to sample", lambda: accept_sampling([], torch.empty(0, dtype=torch.long), torch.zeros(V),
                                                  torch.empty(0, V)), r"root_probs: .* no valid mass"),
]


@pytest.mark.parametrize(("call", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_value_error_naming_the_problem(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
