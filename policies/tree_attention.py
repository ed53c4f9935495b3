"""Token trees verified in one forward: the attention mask and position ids of a draft tree.

A draft tree is given by `parents`: node i's parent is `parents[i]` (an earlier node), or -1 when the node
hangs directly off the last verified token. Verifying the whole tree in one forward needs
- a 4D additive float mask (batch, 1, n_tree, n_past + n_tree): every node sees the whole verified
  context and exactly its own ancestors and itself, never its siblings or cousins;
- depth-based position ids: a node at depth d (root children have depth 0) sits at position n_past + d,
  as it would if its path were decoded as a chain.
With both, each node's logits equal those of running its path on its own (tested against that).
Building block of tree speculative decoding (Sequoia / SpecInfer style).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def validate_parents(parents: Sequence[int], path: str = "parents") -> list[str]:
    """Problems of a parent list, each naming its index (a parent must come before its child)."""
    problems = []
    for i, p in enumerate(parents):
        if not isinstance(p, int) or isinstance(p, bool):
            problems.append(f"{path}[{i}]: must be an integer, got {p!r}")
        elif p < -1 or p >= i:
            problems.append(f"{path}[{i}]: parent {p} must be -1 (the root) or an earlier node (< {i})")
    return problems


def _checked(parents: Sequence[int]) -> list[int]:
    problems = validate_parents(parents)
    if problems:
        raise ValueError(problems[0])
    return list(parents)


def node_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node: 0 for children of the root, parent's depth + 1 otherwise."""
    depths: list[int] = []
    for p in _checked(parents):
        depths.append(0 if p == -1 else depths[p] + 1)
    return depths


def ancestor_matrix(parents: Sequence[int]) -> torch.Tensor:
    """Boolean (n, n): entry [i, j] is True when node j is node i or one of its ancestors."""
    checked = _checked(parents)
    n = len(checked)
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(checked):
        visible[i, i] = True
        if p != -1:
            visible[i] |= visible[p]
    return visible


def tree_position_ids(parents: Sequence[int], n_past: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, n_tree) position ids: n_past + depth."""
    return (torch.tensor(node_depths(parents), device=device) + n_past).unsqueeze(0)


def tree_attention_mask(parents: Sequence[int], n_past: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, n_tree, n_past + n_tree) additive mask: 0 where attention is allowed, dtype-min elsewhere."""
    visible = ancestor_matrix(parents).to(device)
    n = visible.shape[0]
    allowed = torch.cat([torch.ones(n, n_past, dtype=torch.bool, device=device), visible], dim=1)
    mask = torch.zeros(n, n_past + n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node indices from the root's child down to `node`."""
    checked = _checked(parents)
    path = []
    while node != -1:
        path.append(node)
        node = checked[node]
    return path[::-1]


def accept_greedy(parents: Sequence[int], tree_tokens: torch.Tensor, root_logits: torch.Tensor,
                  tree_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy verification: the longest root-to-node path whose every token is the target's argmax given
    what precedes it, plus the bonus token (the target's argmax after the last accepted node).

    `tree_tokens` (n_tree,), `root_logits` (vocab,) are the logits after the verified context,
    `tree_logits` (n_tree, vocab) those after each node. Returns (accepted node indices, bonus token id).
    Children are tried in index order, so ties between identical sibling tokens go to the first.
    """
    checked = _checked(parents)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(checked):
        children.setdefault(p, []).append(i)
    accepted: list[int] = []
    current, logits = -1, root_logits
    while True:
        want = int(logits.argmax())
        match = next((c for c in children.get(current, []) if int(tree_tokens[c]) == want), None)
        if match is None:
            return accepted, want
        accepted.append(match)
        current, logits = match, tree_logits[match]


def compact_cache(cache: object, n_past: int, keep_nodes: Sequence[int]) -> None:
    """Keep the verified context plus the accepted nodes in every layer of a `DynamicCache`, in path order.

    A gather, not a crop: accepted nodes need not be contiguous in the tree's token order. `n_past` is the
    context length before the tree (layer 0's); layers that hold fewer context tokens (token retention
    pruned them at prefill) keep theirs, since every layer received the same tree tokens last. Callables in
    the cache's `autotune_compact_listeners` list (per-token state kept elsewhere about this cache) are
    then called with `(n_tree, keep_nodes)`.
    """
    layers = getattr(cache, "layers", [])
    if not layers:
        return
    n_tree = layers[0].keys.shape[-2] - n_past
    nodes = torch.as_tensor(list(keep_nodes), dtype=torch.long)
    for layer in layers:
        keys, values = layer.keys, layer.values
        if keys is None or not getattr(layer, "is_initialized", True):
            continue  # a layer this cache never ran (a layer-skipping draft's cache)
        layer_past = keys.shape[-2] - n_tree
        src = (nodes + layer_past).to(keys.device)
        end = layer_past + len(nodes)
        # Only the tree part moves: the accepted rows are gathered, written after the context, and the
        # tensor is narrowed (no copy of the context, which is most of the cache).
        layer.keys = keys.narrow(-2, 0, end)
        layer.values = values.narrow(-2, 0, end)
        if len(nodes):
            layer.keys[..., layer_past:end, :] = keys.index_select(-2, src)
            layer.values[..., layer_past:end, :] = values.index_select(-2, src)
    for listener in getattr(cache, "autotune_compact_listeners", ()):
        listener(n_tree, list(keep_nodes))
