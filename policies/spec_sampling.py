"""Lossless sampling verification of a draft token tree: recursive rejection with the residual distribution.

Why the emitted tokens are exactly a sample of the target model, whatever the drafter proposes: take one
node whose target distribution is r, and a child whose token x was drawn from q (the distribution it really
came from, given the siblings drawn before it). Accepting x with probability min(1, r(x) / q(x)) emits each
token y with probability min(q(y), r(y)); the rejection probability is 1 - sum(min(q, r)) = sum(max(r - q, 0)),
and after a rejection we carry on with the residual normalise(max(r - q, 0)). If what follows a rejection emits
a sample of that residual, the node emits min(q, r) + max(r - q, 0) = r in total. The last fallback samples
the residual directly, so induction over the siblings shows that every node emits a sample of r, and
induction over depth (after accepting x, the target's distribution is the one after x) carries this to the
whole emitted sequence. The argument only needs each sibling's token to follow its q row given what came
before it, which covers i.i.d. drafts (SpecInfer, Miao et al. 2024: the same row for every sibling),
draws without replacement (Sequoia, Chen et al. 2024: earlier siblings' tokens zeroed and renormalised) and
deterministic proposals such as prompt lookup or greedy top-k (one-hot rows) — and it is also why passing the
wrong row (say, the plain draft distribution for a without-replacement draw) silently biases the output.

Conventions (as in `policies.tree_attention`): `parents[i]` is node i's parent, an earlier node, or -1 for
a child of the root (the last verified token); the children of a node are tried in index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policies.tree_attention import validate_parents

__all__ = ["accept_sampling", "one_hot_rows", "residual", "sampling_probs", "without_replacement_rows"]


# -- target / draft distributions -------------------------------------------------------------------------------
def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """float32 probabilities of `logits` (..., V) under temperature and nucleus (top-p) sampling.

    Same semantics as Hugging Face's TemperatureLogitsWarper followed by TopPLogitsWarper, so a tuned policy
    samples like `generate(do_sample=True)`: in ascending order of logit, drop tokens whose cumulative
    probability is <= 1 - top_p, always keeping the most likely one, then renormalise. `temperature == 0`
    is greedy: a one-hot row at the (first) argmax, the limit of a vanishing temperature.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() == 0:
        raise ValueError(f"logits: must be a floating-point tensor of shape (..., vocab), got {_describe(logits)}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature: must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p: must be in [0, 1], got {top_p!r}")
    logits = logits.float()
    if temperature == 0:
        return one_hot_rows(logits.argmax(dim=-1), logits.shape[-1])
    # Shifting by the max first keeps a tiny temperature finite (others go to -inf, the max to 0).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / float(temperature)
    if top_p < 1.0:
        scaled = scaled.masked_fill(_outside_nucleus(scaled, float(top_p)), float("-inf"))
    return scaled.softmax(dim=-1)


def _outside_nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the tokens top-p removes (HF TopPLogitsWarper, min_tokens_to_keep=1)."""
    ascending, order = scaled.sort(dim=-1, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1.0 - top_p
    remove[..., -1] = False
    return remove.scatter(-1, order, remove)


def one_hot_rows(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 (..., vocab_size) point masses at `tokens`: the q rows of a deterministic drafter."""
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens: ids must lie in [0, {vocab_size}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    return torch.nn.functional.one_hot(tokens.long(), vocab_size).float()


def without_replacement_rows(parents: Sequence[int], tokens: torch.Tensor, base_probs: torch.Tensor) -> torch.Tensor:
    """The q rows of siblings drawn one after another without replacement (Sequoia).

    `base_probs` (n, V) row i is the distribution node i would be drawn from if it were the first child
    (the draft model's distribution after node i's parent, or a one-hot row for a deterministic proposal);
    the returned row i has the tokens of node i's earlier siblings zeroed and is renormalised. Raises when
    nothing is left to draw from (the node could not have been drawn that way).
    """
    if not isinstance(base_probs, torch.Tensor) or base_probs.dim() != 2:
        raise ValueError(f"base_probs: must be a 2-D tensor (n, vocab), got {_describe(base_probs)}")
    parents, token_ids, n = _checked_tree(parents, tokens, base_probs.shape[1])
    _check_rows("base_probs", base_probs, n, base_probs.shape[1])
    rows = _as_work(base_probs).clone()
    drawn: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        earlier = drawn.setdefault(p, [])
        if earlier:
            rows[i, earlier] = 0
        total = float(rows[i].sum())
        if not total > 0:
            raise ValueError(f"base_probs[{i}]: no mass left once earlier siblings' tokens {earlier} are removed")
        rows[i] /= total
        earlier.append(token_ids[i])
    return rows


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(p - q, 0)) over the last dim: what the target must still emit after rejecting a draw from q.

    Where the residual has (numerically) no mass, p is returned unchanged: that happens only when p <= q
    everywhere, i.e. p == q up to rounding, where acceptance was certain and a rejection is a rounding artefact.
    """
    p, q = _as_work(p), _as_work(q)
    left = (p - q).clamp_min(0)
    return _normalised_or(left, p)


def _normalised_or(left: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """left / left.sum(-1), or `fallback` on rows whose mass is below rounding noise (no host sync)."""
    mass = left.sum(dim=-1, keepdim=True)
    floor = 64 * torch.finfo(left.dtype).eps
    return torch.where(mass > floor, left / mass.clamp_min(floor), fallback)


# -- verification -----------------------------------------------------------------------------------------------
def accept_sampling(parents: Sequence[int], tokens: torch.Tensor, root_probs: torch.Tensor,
                    tree_probs: torch.Tensor, draft_probs: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Multi-draft speculative sampling over a tree: (accepted node indices in path order, next token).

    `root_probs` (V,) is the target's distribution after the root, `tree_probs` (n, V) the one after each node
    (both already temperature / top-p processed, e.g. by `sampling_probs`). `draft_probs` (n, V) row i is the
    distribution node i's token was actually drawn from given its earlier siblings; None means every node is
    a deterministic proposal (one-hot rows). From the root, children are tried in index order: child c with
    token x is accepted with probability min(1, p(x) / q_c(x)) (q_c(x) == 0: rejected) and verification moves
    on to c's children with p = tree_probs[c]; a rejection replaces p by `residual(p, q_c)`. When no child
    is accepted, the next token is sampled from p. The returned token is the target's own token after the
    accepted path (the "bonus" token), so every call emits len(accepted) + 1 tokens.

    Random draws use `generator` (which, as for any torch sampling call, must live on the probabilities'
    device): one `torch.rand` of n uniforms (node i uses the i-th, each node being tried at most once) and
    one `torch.multinomial`, so a seeded generator makes the result deterministic.
    """
    vocab = _vocab_of(root_probs)
    parents, token_ids, _ = _checked_tree(parents, tokens, vocab)
    _check_rows("tree_probs", tree_probs, len(parents), vocab)
    if draft_probs is not None:
        _check_rows("draft_probs", draft_probs, len(parents), vocab)
    children = _children(parents)
    uniforms = torch.rand(len(parents), generator=generator, device=root_probs.device).tolist()
    accepted: list[int] = []
    node, p = -1, _as_work(root_probs)
    while True:
        for child in children.get(node, ()):
            x = token_ids[child]
            q = None if draft_probs is None else _as_work(draft_probs[child])
            if _accepts(p, q, x, uniforms[child]):
                accepted.append(child)
                node, p = child, _as_work(tree_probs[child])
                break
            p = _after_rejection(p, q, x)
        else:
            return accepted, _sample(p, node, generator)


def _accepts(p: torch.Tensor, q: torch.Tensor | None, x: int, u: float) -> bool:
    """The coin of min(1, p(x) / q(x)) with u ~ U[0, 1); q None is a point mass at x (q(x) = 1)."""
    q_x = 1.0 if q is None else float(q[x])
    return q_x > 0 and u * q_x < float(p[x])


def _after_rejection(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """The residual after rejecting x drawn from q; for a point mass at x that is p with x removed."""
    if q is not None:
        return residual(p, q)
    left = p.clone()
    left[x] = 0
    return _normalised_or(left, p)


def _sample(p: torch.Tensor, node: int, generator: torch.Generator | None) -> int:
    total = float(p.sum())
    if not 0 < total < float("inf"):
        where = "root_probs" if node == -1 else f"tree_probs[{node}]"
        raise ValueError(f"{where}: the distribution to sample the next token from has no valid mass (sum {total})")
    return int(torch.multinomial(p, 1, generator=generator))


# -- validation and small helpers -------------------------------------------------------------------------------
def _children(parents: Sequence[int]) -> dict[int, list[int]]:
    """Children of each node (-1: the root) in index order, the order siblings are tried in."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    return children


def _checked_tree(parents: Sequence[int], tokens: torch.Tensor, vocab: int) -> tuple[list[int], list[int], int]:
    """Validated (parents, token ids, n); ValueError naming the first problem otherwise."""
    problems = validate_parents(parents)
    if problems:
        raise ValueError(problems[0])
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: must be an integer tensor, got dtype {tokens.dtype}")
    n = len(parents)
    if tuple(tokens.shape) != (n,):
        raise ValueError(f"tokens: shape must be ({n},) to match parents, got {tuple(tokens.shape)}")
    ids = [int(t) for t in tokens.tolist()]
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"tokens[{bad}]: id {ids[bad]} outside the vocabulary [0, {vocab})")
    return list(parents), ids, n


def _vocab_of(root_probs: torch.Tensor) -> int:
    if not isinstance(root_probs, torch.Tensor) or not root_probs.is_floating_point() or root_probs.dim() != 1:
        raise ValueError(f"root_probs: must be a 1-D floating-point tensor (vocab,), got {_describe(root_probs)}")
    if root_probs.shape[0] == 0:
        raise ValueError("root_probs: the vocabulary must not be empty")
    return root_probs.shape[0]


def _check_rows(name: str, rows: torch.Tensor, n: int, vocab: int) -> None:
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
        raise ValueError(f"{name}: must be a floating-point tensor of shape ({n}, {vocab}), got {_describe(rows)}")
    if tuple(rows.shape) != (n, vocab):
        raise ValueError(f"{name}: shape must be ({n}, {vocab}) (one row per tree node, vocab of root_probs), "
                         f"got {tuple(rows.shape)}")


def _as_work(t: torch.Tensor) -> torch.Tensor:
    """Half precision is too coarse for residual arithmetic: work in float32 at least."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
