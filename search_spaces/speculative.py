"""Speculative decoding: which drafter, which tree, for this model on this device.

Parameters an Optuna trial samples (`speculative.*`):
- `drafter`: `draft_model` (a small model sharing the tokenizer; offered when one is known for the target),
  `layer_skip` (the target without a contiguous block of `skip.n` layers from `skip.start`), `prompt_lookup`
  (`lookup.max_ngram`, `lookup.depth`, `lookup.candidates`), `recycle` (Token Recycling: the target's own
  earlier top-k predictions per token, no draft forward), `eagle` (a feature-level draft head, offered when
  one is known for the target: `eagle.vocab`, the draft vocabulary (FR-Spec; 0 = all tokens), and its tree
  `eagle.tree`: `dynamic` (EAGLE-2: `dynamic.depth`, `dynamic.topk`, `dynamic.tokens`) or `chain` (`chain.k`));
- for model and recycle drafters, the tree `shape`: `sequoia` (the dynamic-programming tree of `budget`
  nodes and at most `depth` levels for the drafter's measured positional acceptance vector), `chain` (`k`),
  or `branching` (a per-depth branching vector `b0..b{depth-1}`, capped at the node budget).

Cost hook: a step yields `1 + E[accepted]` tokens for `draft time + verify time(tree size + 1)`.
`prepare` measures, on this device and for this workload, the target's verify curve
(`search_spaces.speculative_profiler`), the draft model's and the fully-skipped target's curves (a layer-skip draft
costs in proportion to the layers it keeps), and the acceptance of each drafter on the target's own greedy
continuations of the workload's prompts: the positional acceptance vector (Sequoia) of model drafters and
of token recycling (simulated), and the exact simulated tokens per step of prompt lookup. So the chosen
tree depends on both the model pair and the hardware: a flat verify curve (a GPU) favours wide trees, a
steep one (a CPU) small trees.

Presets (enqueued first, shown in `autotune bench`): a chain of k=5 (gpt-fast's default) and an
EAGLE-2/SGLang-like dynamic tree (depth 5, top-k 4, 8 draft tokens), both with the draft model; and prompt
lookup with HF's defaults (10 tokens, n-grams up to 2) when no draft model is known. With a draft head:
EAGLE-2's defaults (60 tree tokens, top-k 10, depth 6 counting the root's children), SGLang's (5 steps, top-k
4, 8 tokens with the root), a k=5 chain, the best head-free drafter measured on SmolLM2 (token recycling
[2, 1, 1] plus 2-gram lookup), and the hardware-aware choice over a grid of trees and vocabularies.

The EAGLE drafter's cost is measured rather than modelled (`search_spaces.speculative_eagle`): the real
drafter runs over the calibration continuations with the target's features, which gives its exact greedy
tokens per step and its draft time per step on this device (head forwards and LM-head rows for the draft
vocabulary); the verify curve prices the rest.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace, StudyInputs
from search_spaces.speculative_trees import branching_tree, chain_tree, expected_accepted, sequoia_tree

MAX_RANK = 8
RECYCLE_K = 8  # >= the widest node any sampled shape has (branching <= 4, Sequoia over MAX_RANK ranks)
MAX_BUDGET = 64
SHAPES = ("sequoia", "chain", "branching")
#: Draft vocabulary sizes sampled for the eagle drafter (0: every token); sizes >= the vocabulary are dropped.
EAGLE_VOCABS = (0, 2048, 4096, 8192, 16384, 32768)
EAGLE_TREES = ("dynamic", "chain")


@dataclass
class SpeculativeCalibration:
    """What `prepare` measures on this device for the cost model (`ctx.prepared["speculative"]`), and the
    acceptance vectors computed from it on first use (one model pass per drafter, so cached here).

    Curves are `search_spaces.speculative_profiler.profile_verify` rows; the overheads are milliseconds."""

    model: Any  # the target: acceptance of each drafter is measured on first use against it
    verify: list[dict[str, Any]]  # the target's verify curve
    skip_all: list[dict[str, Any]] | None = None  # the target with layer 0 only (None: a one-layer model)
    draft: list[dict[str, Any]] | None = None  # the draft model's curve (None: no draft model)
    #: (prompt, target greedy continuation) pairs the acceptance is measured on (`calibration_sequences`)
    sequences: list[tuple[list[int], list[int]]] = field(default_factory=list)
    step_overhead_ms: float = 0.0  # the decode loop's own time per step beyond the verify forward
    #: Per-forward bookkeeping of each model drafter beyond its profiled forward; measured whenever the
    #: drafter's curve is (`skip_all`, `draft`), and only read then.
    layer_skip_overhead_ms: float = 0.0
    draft_model_overhead_ms: float = 0.0
    #: Positional acceptance vector per drafter key (`draft_model`, `recycle`, `skip:<layers>`), filled lazily.
    acceptance: dict[str, list[float]] = field(default_factory=dict)
    #: The eagle drafter's simulations by section key, and the target's features per calibration sequence.
    eagle: dict[str, Any] = field(default_factory=dict)
    features: dict[int, Any] = field(default_factory=dict)

    def per_forward_overhead_ms(self, drafter: str) -> float:
        """The measured per-forward overhead of model drafter `drafter` ("draft_model" or "layer_skip")."""
        if drafter == "draft_model":
            return self.draft_model_overhead_ms
        if drafter == "layer_skip":
            return self.layer_skip_overhead_ms
        raise ValueError(f"speculative: drafter {drafter!r} has no per-forward overhead (not a model drafter)")


def tree_from_params(params: dict[str, Any], acceptance: Sequence[float] | None) -> tuple[list[int], dict[str, Any]]:
    """The static tree a trial's shape parameters describe, and the `shape` provenance record."""
    shape = params["speculative.shape"]
    if shape == "chain":
        k = int(params["speculative.chain.k"])
        return chain_tree(k), {"kind": "chain", "k": k}
    if shape == "branching":
        depth = int(params["speculative.branching.depth"])
        vector = [int(params[f"speculative.branching.b{i}"]) for i in range(depth)]
        parents = branching_tree(vector)
        return _cap(parents, MAX_BUDGET), {"kind": "branching", "branching": vector}
    budget, depth = int(params["speculative.sequoia.budget"]), int(params["speculative.sequoia.depth"])
    acc = list(acceptance or [0.6, 0.1, 0.05])
    parents = sequoia_tree(acc, budget, max_depth=depth) or chain_tree(1)
    return parents, {"kind": "sequoia", "node_budget": budget, "max_depth": depth,
                     "acceptance": [round(a, 4) for a in acc]}


def _cap(parents: list[int], budget: int) -> list[int]:
    """The first `budget` nodes of a BFS-ordered tree (parents come first, so the prefix is a tree)."""
    return parents[:budget]


class SpeculativeSpace(SearchSpace):
    name = "speculative"
    quality_metric = "accuracy"
    lossless = True  # greedy output must equal dense greedy output: tune fails trials that differ
    needs_layer_profile = False  # its cost model is the verify curves `prepare` measures

    # -- sampling -------------------------------------------------------------------------------------------
    def _drafters(self, ctx: SearchContext) -> list[str]:
        kinds = ["layer_skip", "prompt_lookup", "recycle"]
        return (["draft_model"] if self._draft_spec(ctx) else []) + kinds + (["eagle"] if ctx.draft_head else [])

    @staticmethod
    def _draft_spec(ctx: SearchContext) -> str | None:
        """The draft model the tuner chose (`--draft-model`, else the one known for the target), or None."""
        return ctx.draft_model

    def _calibration(self, ctx: SearchContext) -> SpeculativeCalibration | None:
        """This study's measurements, or None when `prepare` did not run (sampling still works, unmodelled)."""
        return ctx.prepared_or_none(self.name, SpeculativeCalibration)

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        n_layers = ctx.num_layers
        drafter = trial.suggest_categorical("speculative.drafter", self._drafters(ctx))
        if drafter == "prompt_lookup":
            lookup = {"max_ngram": trial.suggest_int("speculative.lookup.max_ngram", 1, 4),
                      "depth": trial.suggest_int("speculative.lookup.depth", 1, 12),
                      "candidates": trial.suggest_int("speculative.lookup.candidates", 1, 4)}
            return {"drafter": drafter, "prompt_lookup": lookup,
                    "node_budget": max(MAX_BUDGET, lookup["depth"] * lookup["candidates"])}
        if drafter == "eagle":
            return self._suggest_eagle(trial, ctx)
        section: dict[str, Any] = {"drafter": drafter}
        if drafter == "draft_model":
            section["draft_model"] = self._draft_spec(ctx)
            key = "draft_model"
        elif drafter == "recycle":
            section["recycle"] = {"k": RECYCLE_K}
            key = "recycle"
            if trial.suggest_categorical("speculative.recycle.with_lookup", [False, True]):
                section["prompt_lookup"] = {"max_ngram": trial.suggest_int("speculative.lookup.max_ngram", 1, 4),
                                            "depth": trial.suggest_int("speculative.lookup.depth", 1, 12),
                                            "candidates": 1}
        else:
            n = trial.suggest_int("speculative.skip.n", 1, max(1, n_layers - 2))
            start = trial.suggest_int("speculative.skip.start", 1, max(1, n_layers - n))
            section["skip_layers"] = list(range(start, min(n_layers, start + n)))
            key = _skip_key(section["skip_layers"])
        shape = trial.suggest_categorical("speculative.shape", SHAPES)
        if shape == "chain":
            trial.suggest_int("speculative.chain.k", 1, 10)
        elif shape == "branching":
            depth = trial.suggest_int("speculative.branching.depth", 1, 6)
            for i in range(depth):
                trial.suggest_int(f"speculative.branching.b{i}", 1, 4 if i < 2 else 2)
        else:
            trial.suggest_int("speculative.sequoia.budget", 2, MAX_BUDGET, log=True)
            trial.suggest_int("speculative.sequoia.depth", 1, 10)
        parents, provenance = tree_from_params(trial.params, self._acceptance(ctx, key, section))
        extra = section.get("prompt_lookup", {}).get("depth", 0)
        section.update(tree={"kind": "static", "parents": parents}, node_budget=MAX_BUDGET + extra, shape=provenance)
        return section

    def _suggest_eagle(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        vocab_size = int(ctx.model_fingerprint.get("vocab_size") or 0)
        vocab = trial.suggest_categorical("speculative.eagle.vocab", _eagle_vocabs(vocab_size))
        kind = trial.suggest_categorical("speculative.eagle.tree", EAGLE_TREES)
        if kind == "chain":
            k = trial.suggest_int("speculative.chain.k", 1, 10)
            tree: dict[str, Any] = {"kind": "static", "parents": chain_tree(k)}
        else:
            depth = trial.suggest_int("speculative.dynamic.depth", 2, 8)
            topk = trial.suggest_int("speculative.dynamic.topk", 1, 10)
            most = min(MAX_BUDGET, topk + (depth - 1) * topk * topk)
            tree = {"kind": "dynamic", "depth": depth, "topk": topk,
                    "tokens": trial.suggest_int("speculative.dynamic.tokens", min(2, most), most, log=True)}
        return eagle_section(str(ctx.draft_head), vocab, tree)

    def _eagle_presets(self, ctx: SearchContext) -> list[Preset]:
        head = str(ctx.draft_head)
        out = [
            Preset("eagle2-default", {"speculative.drafter": "eagle", "speculative.eagle.vocab": 0,
                                      "speculative.eagle.tree": "dynamic", "speculative.dynamic.depth": 6,
                                      "speculative.dynamic.topk": 10, "speculative.dynamic.tokens": 59},
                   eagle_section(head, 0, {"kind": "dynamic", "depth": 6, "topk": 10, "tokens": 59}),
                   "EAGLE-2's defaults: 60 tree tokens with the root, top-k 10, depth 5 after the root's children"),
            Preset("sglang-eagle", {"speculative.drafter": "eagle", "speculative.eagle.vocab": 0,
                                    "speculative.eagle.tree": "dynamic", "speculative.dynamic.depth": 5,
                                    "speculative.dynamic.topk": 4, "speculative.dynamic.tokens": 7},
                   eagle_section(head, 0, {"kind": "dynamic", "depth": 5, "topk": 4, "tokens": 7}),
                   "SGLang's choice for Llama: 5 steps, top-k 4, 8 draft tokens with the root"),
            Preset("eagle-chain-k5", {"speculative.drafter": "eagle", "speculative.eagle.vocab": 0,
                                      "speculative.eagle.tree": "chain", "speculative.chain.k": 5},
                   eagle_section(head, 0, {"kind": "static", "parents": chain_tree(5)}),
                   "a chain of 5 head-drafted tokens"),
            Preset("recycle-lookup", {"speculative.drafter": "recycle", "speculative.recycle.with_lookup": True,
                                      "speculative.lookup.max_ngram": 2, "speculative.lookup.depth": 5,
                                      "speculative.shape": "branching", "speculative.branching.depth": 3,
                                      "speculative.branching.b0": 2, "speculative.branching.b1": 1,
                                      "speculative.branching.b2": 1},
                   {"drafter": "recycle", "recycle": {"k": RECYCLE_K}, "node_budget": MAX_BUDGET + 5,
                    "prompt_lookup": {"max_ngram": 2, "depth": 5, "candidates": 1},
                    "tree": {"kind": "static", "parents": branching_tree([2, 1, 1])},
                    "shape": {"kind": "branching", "branching": [2, 1, 1]}},
                   "the best drafter without a head on SmolLM2 (issue 14): token recycling [2, 1, 1] + 2-gram lookup"),
        ]
        seed = self.eagle_hardware_seed(ctx)
        return ([seed] if seed is not None else []) + out

    def eagle_hardware_seed(self, ctx: SearchContext) -> Preset | None:
        """The best tree and vocabulary on a small grid by this device's cost model (simulated acceptance,
        measured draft time, the verify curve): what the hardware alone would choose."""
        if self._calibration(ctx) is None:
            return None
        vocab_size = int(ctx.model_fingerprint.get("vocab_size") or 0)
        best: tuple[float, dict[str, Any], dict[str, Any]] | None = None
        for vocab in [v for v in (0, 8192) if v in _eagle_vocabs(vocab_size)]:
            for depth, topk, tokens in ((3, 2, 4), (4, 2, 6), (5, 3, 10)):
                tree = {"kind": "dynamic", "depth": depth, "topk": topk, "tokens": tokens}
                section = eagle_section(str(ctx.draft_head), vocab, tree)
                model = self.step_model(section, ctx)
                if model is not None and (best is None or model[0] / model[1] > best[0]):
                    params = {"speculative.drafter": "eagle", "speculative.eagle.vocab": vocab,
                              "speculative.eagle.tree": "dynamic", "speculative.dynamic.depth": depth,
                              "speculative.dynamic.topk": topk, "speculative.dynamic.tokens": tokens}
                    best = (model[0] / model[1], params, section)
        if best is None:
            return None
        return Preset("eagle-hw", best[1], best[2], "the tree and draft vocabulary this device's cost model "
                      "predicts fastest (simulated acceptance, measured draft time, verify curve)")

    def presets(self, ctx: SearchContext) -> list[Preset]:
        if ctx.draft_head:
            return self._eagle_presets(ctx)
        draft = self._draft_spec(ctx)
        if draft is None:
            params = {"speculative.drafter": "prompt_lookup", "speculative.lookup.max_ngram": 2,
                      "speculative.lookup.depth": 10, "speculative.lookup.candidates": 1}
            section = {"drafter": "prompt_lookup", "prompt_lookup": {"max_ngram": 2, "depth": 10, "candidates": 1},
                       "node_budget": MAX_BUDGET}
            return [Preset("prompt-lookup", params, section, "HF prompt lookup defaults: 10 tokens, n-grams <= 2")]
        chain = {"speculative.drafter": "draft_model", "speculative.shape": "chain", "speculative.chain.k": 5}
        seeded = [self.hardware_seed(ctx, draft)] if self._calibration(ctx) is not None else []
        return [p for p in seeded if p is not None] + [
            Preset("chain-k5", chain, {"drafter": "draft_model", "draft_model": draft, "node_budget": MAX_BUDGET,
                                       "tree": {"kind": "static", "parents": chain_tree(5)},
                                       "shape": {"kind": "chain", "k": 5}},
                   "gpt-fast's default speculate_k=5: a chain of 5 draft tokens"),
            Preset("eagle-default", None, {"drafter": "draft_model", "draft_model": draft, "node_budget": MAX_BUDGET,
                                           "tree": {"kind": "dynamic", "depth": 5, "topk": 4, "tokens": 8}},
                   "EAGLE-2 / SGLang defaults: 5 draft steps, top-k 4, 8 draft tokens (dynamic tree)"),
        ]

    def peers(self, model: Any, section: dict[str, Any], ctx: SearchContext) -> list[Any]:
        """Hugging Face assisted generation with the same draft model, and HF prompt-lookup decoding."""
        from search_spaces.speculative_peers import hf_speculative_peers

        draft = section.get("draft_model") or self._draft_spec(ctx)
        return hf_speculative_peers(model, {**section, "draft_model": draft} if draft else section)

    def hardware_seed(self, ctx: SearchContext, draft: str) -> Preset | None:
        """Sequoia's hardware-aware choice: over node budgets and depths, the dynamic-programming tree for the
        draft's measured acceptance vector whose predicted tokens/s on this device's verify curve is best."""
        from search_spaces.speculative_trees import sequoia_curve

        section = {"drafter": "draft_model", "draft_model": draft}
        acc = self._acceptance(ctx, "draft_model", section)
        if acc is None:
            return None
        best: tuple[float, int, int, list[int]] | None = None
        budgets = [b for b in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if b <= MAX_BUDGET]
        for depth in range(1, 11):
            for budget, (_, parents) in sequoia_curve(acc, budgets, max_depth=depth).items():
                if not parents:
                    continue
                model = self.step_model({**section, "tree": {"kind": "static", "parents": parents}}, ctx)
                if model is not None and (best is None or model[0] / model[1] > best[0]):
                    best = (model[0] / model[1], budget, depth, parents)
        if best is None:
            return None
        _, budget, depth, parents = best
        params = {"speculative.drafter": "draft_model", "speculative.shape": "sequoia",
                  "speculative.sequoia.budget": budget, "speculative.sequoia.depth": depth}
        return Preset("sequoia-hw", params,
                      {**section, "node_budget": MAX_BUDGET, "tree": {"kind": "static", "parents": parents},
                       "shape": {"kind": "sequoia", "node_budget": budget, "max_depth": depth}},
                      "Sequoia: DP tree for the measured acceptance, size chosen on this device's verify curve")

    # -- profile and cost model -----------------------------------------------------------------------------
    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any,
                device: torch.device) -> SpeculativeCalibration:
        """Measure the verify curves and the calibration sequences the cost model needs (once per study)."""
        from search_spaces.speculative_profiler import profile_verify

        if ctx.draft_head:  # a head that does not load for this target fails here, in one line, before any trial
            from policies.speculative import load_draft_head

            load_draft_head(ctx.draft_head, model)

        inputs = ctx.study_inputs()
        prompt, new = int(ctx.workload["prompt_tokens"]), int(ctx.workload["new_tokens"])
        kv = sorted({prompt, prompt + new})
        calibration = SpeculativeCalibration(model=model, verify=profile_verify(model, device, kv))
        from policies.drafters import LayerSkipLM

        n_layers = ctx.num_layers
        if n_layers > 1:
            calibration.skip_all = profile_verify(LayerSkipLM(model, range(1, n_layers)), device, kv,
                                                  vocab_size=model.config.vocab_size)
        draft = self._draft_spec(ctx)
        if draft is not None:
            from policies.speculative import draft_for

            # Checked first: a --draft-model with another tokenizer fails here, in one line, before any trial.
            calibration.draft = profile_verify(draft_for(draft, model), device, kv)
        calibration.sequences = calibration_sequences(model, tokenizer, device, ctx.workload, inputs)
        _save_profile(ctx, calibration)
        self._measure_draft_overheads(ctx, calibration, device)
        calibration.step_overhead_ms = step_overhead_ms(model, tokenizer, device, ctx.workload, calibration.verify,
                                                        inputs)
        return calibration

    def _measure_draft_overheads(self, ctx: SearchContext, calibration: SpeculativeCalibration,
                                 device: torch.device) -> None:
        """Per-forward bookkeeping of each model drafter, on the first calibration prompt."""
        from policies.drafters import LayerSkipLM
        from search_spaces.speculative_profiler import VerifyCurve

        prompt = calibration.sequences[0][0]
        n_layers = ctx.num_layers
        if calibration.skip_all is not None:
            middle = list(range(max(1, n_layers // 4), max(2, 3 * n_layers // 4)))
            section = {"drafter": "layer_skip", "skip_layers": middle}
            curve = self._draft_curve(section, ctx, calibration)
            calibration.layer_skip_overhead_ms = draft_overhead_ms(LayerSkipLM(calibration.model, middle), prompt,
                                                                   curve)
        if calibration.draft is not None:
            from policies.speculative import load_draft_model

            lm = load_draft_model(self._draft_spec(ctx), device)
            calibration.draft_model_overhead_ms = draft_overhead_ms(lm, prompt, VerifyCurve(calibration.draft))

    def _acceptance(self, ctx: SearchContext, key: str, section: dict[str, Any]) -> list[float] | None:
        """Positional acceptance vector of a model drafter (cached per drafter in the calibration); None
        when `prepare` did not run."""
        calibration = self._calibration(ctx)
        if calibration is None or not calibration.sequences:
            return None
        cache = calibration.acceptance
        if key in cache:
            return cache[key]
        model, sequences = calibration.model, calibration.sequences
        if section["drafter"] == "recycle":
            cache[key] = recycle_acceptance(model, sequences, int(section.get("recycle", {}).get("k", RECYCLE_K)))
            return cache[key]
        if section["drafter"] == "draft_model":
            from policies.speculative import load_draft_model

            lm = load_draft_model(section["draft_model"], next(model.parameters()).device)
        else:
            from policies.drafters import LayerSkipLM

            lm = LayerSkipLM(model, section["skip_layers"])
        cache[key] = rank_acceptance(lm, sequences)
        return cache[key]

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Predicted end-to-end latency (or TTFT) of generating the workload with `section` on this device."""
        ttft = ctx.baseline_ms("ttft_ms")
        if self._calibration(ctx) is None or ttft is None:
            return None
        if ctx.objective == "ttft_ms":
            return ttft
        per_step = self.step_model(section, ctx)
        if per_step is None:
            return None
        tokens, step_ms = per_step
        return ttft + (int(ctx.workload["new_tokens"]) - 1) / tokens * step_ms

    def step_model(self, section: dict[str, Any], ctx: SearchContext) -> tuple[float, float] | None:
        """(expected tokens per step, predicted ms per step) of `section`, or None without a model for it
        (`prepare` did not run, or nothing measured for this drafter)."""
        from search_spaces.speculative_profiler import VerifyCurve

        calibration = self._calibration(ctx)
        if calibration is None:
            return None
        kv = int(ctx.workload["prompt_tokens"]) + int(ctx.workload["new_tokens"]) / 2
        verify = VerifyCurve(calibration.verify)
        overhead = calibration.step_overhead_ms
        if section["drafter"] == "prompt_lookup":
            if not calibration.sequences:
                return None
            tokens, tree_size = self._lookup_model(section, calibration)
            return tokens, verify.ms(tree_size + 1, kv) + overhead
        if section["drafter"] == "eagle":
            if not calibration.sequences:
                return None
            sim = self.eagle_simulation(section, calibration)
            return sim.tokens_per_step, sim.draft_ms + verify.ms(sim.tree_size + 1, kv) + overhead
        tree = section.get("tree", {})
        if tree.get("kind") != "static":
            return None
        parents = tree["parents"]
        key = section["drafter"] if section["drafter"] != "layer_skip" else _skip_key(section["skip_layers"])
        acc = self._acceptance(ctx, key, section)
        if acc is None:
            return None
        if section["drafter"] == "recycle":  # no draft forward: the tree comes from a table lookup
            tokens, size = 1 + expected_accepted(parents, acc), float(len(parents))
            if "prompt_lookup" in section:  # merged lookup branch: roughly the better of the two, both verified
                lookup_tokens, lookup_size = self._lookup_model(section, calibration)
                tokens, size = max(tokens, lookup_tokens), size + lookup_size
            return tokens, verify.ms(size + 1, kv) + overhead
        draft_curve = self._draft_curve(section, ctx, calibration)
        if draft_curve is None:
            return None
        tokens = 1 + expected_accepted(parents, acc)
        per_forward = calibration.per_forward_overhead_ms(section["drafter"])
        drafting = draft_ms(parents, draft_curve, kv, tokens, per_forward)
        return tokens, drafting + verify.ms(len(parents) + 1, kv) + overhead

    @staticmethod
    def eagle_simulation(section: dict[str, Any], calibration: SpeculativeCalibration) -> Any:
        """The eagle section's simulated decode on the calibration continuations (cached per section)."""
        from policies.speculative import SpeculativeConfig, make_drafter
        from search_spaces.speculative_eagle import section_key, simulate_eagle

        key = section_key(section)
        if key not in calibration.eagle:
            drafter = make_drafter(calibration.model, SpeculativeConfig.build(section))
            try:
                calibration.eagle[key] = simulate_eagle(calibration.model, drafter, calibration.sequences,
                                                        calibration.features)
            finally:
                drafter.close()
        return calibration.eagle[key]

    @staticmethod
    def _lookup_model(section: dict[str, Any], calibration: SpeculativeCalibration) -> tuple[float, float]:
        """(tokens per step, mean tree size) of the section's prompt lookup, simulated on the calibration text."""
        from policies.speculative import PromptLookupConfig

        drafter = PromptLookupConfig.build(section.get("prompt_lookup") or {}).drafter()  # the runtime's defaults
        return lookup_simulation(drafter, calibration.sequences)

    def _draft_curve(self, section: dict[str, Any], ctx: SearchContext, calibration: SpeculativeCalibration) -> Any:
        """The drafter's forward curve: the draft model's, or for a layer skip the fully-skipped target's
        moved toward the full target's in proportion to the layers it keeps; None when not measured."""
        from search_spaces.speculative_profiler import VerifyCurve

        if section["drafter"] == "draft_model":
            rows = calibration.draft
            return None if rows is None else VerifyCurve(rows)
        rows_one = calibration.skip_all
        if rows_one is None:
            return None
        kept = ctx.num_layers - len(section["skip_layers"])
        full = {(r["n_query"], r["n_kv"]): r["ms"] for r in calibration.verify}
        w = (kept - 1) / max(1, ctx.num_layers - 1)
        return VerifyCurve([{**r, "ms": (1 - w) * r["ms"] + w * full[(r["n_query"], r["n_kv"])]} for r in rows_one])


def _eagle_vocabs(vocab_size: int) -> list[int]:
    return [v for v in EAGLE_VOCABS if v == 0 or not vocab_size or v < vocab_size]


def eagle_section(head: str, vocab: int, tree: dict[str, Any]) -> dict[str, Any]:
    """The policy section of the eagle drafter with `head`, draft vocabulary `vocab` (0: all) and `tree`."""
    return {"drafter": "eagle", "eagle": {"head": head, "vocab": int(vocab) or None}, "tree": tree,
            "node_budget": MAX_BUDGET}


def _save_profile(ctx: SearchContext, calibration: SpeculativeCalibration) -> None:
    """Write the verify curves beside the study (`speculative-verify.csv`) for reports and inspection."""
    import pandas as pd

    artefacts = ctx.artefacts
    if artefacts is None:
        return
    frames = [pd.DataFrame(rows).assign(model=name) for rows, name in
              ((calibration.verify, "target"), (calibration.skip_all, "target, layer 0 only"),
               (calibration.draft, "draft")) if rows is not None]
    tmp = artefacts / "speculative-verify.csv.tmp"
    pd.concat(frames).to_csv(tmp, index=False)
    tmp.replace(artefacts / "speculative-verify.csv")


def _skip_key(skip: Sequence[int]) -> str:
    return "skip:" + ",".join(str(i) for i in skip)


def draft_ms(parents: Sequence[int], curve: Any, kv: float, tokens_per_step: float,
             per_forward_overhead_ms: float = 0.0) -> float:
    """Draft time of a static tree: one forward over the pending tokens (about the previous step's accepted
    tokens that the draft has not seen, plus the root), then one per depth over the nodes that get children;
    each forward also pays the drafter's own bookkeeping (`per_forward_overhead_ms`, measured)."""
    from policies.tree_attention import node_depths

    depths = node_depths(parents)
    has_children = {p for p in parents if p != -1}
    total = curve.ms(max(1.0, tokens_per_step / 2), kv) + per_forward_overhead_ms
    for depth in range(max(depths, default=-1)):
        fed = sum(1 for i, d in enumerate(depths) if d == depth and i in has_children)
        if fed:
            total += curve.ms(fed, kv) + per_forward_overhead_ms
    return total


def draft_overhead_ms(lm: Any, prompt: Sequence[int], curve: Any, depth: int = 4, rounds: int = 12) -> float:
    """Per-forward time of a `ModelDrafter` beyond its model's profiled forward (tree masks, top-k, cache
    bookkeeping): chains of `depth` drafted after a growing context, minus what the curve predicts for them.
    This Python work does not shrink with more threads while the forward does, so it shapes the best tree."""
    import time

    from policies.drafters import ModelDrafter, Sampling

    drafter = ModelDrafter(lm, chain_tree(depth))
    context = list(prompt)
    drafter.begin(torch.tensor([context]))
    with torch.inference_mode():
        drafter.propose(context, Sampling(), None)  # the draft's own prefill
        drafter.commit([])
        times = []
        for r in range(rounds):
            context.append(context[-1 - r])
            start = time.perf_counter()
            drafter.propose(context, Sampling(), None)
            times.append((time.perf_counter() - start) * 1e3)
            drafter.commit([])
    predicted = depth * curve.ms(1, len(context))
    return max(0.0, (statistics.median(times[2:]) - predicted) / depth)


def step_overhead_ms(model: Any, tokenizer: Any, device: torch.device, workload: dict[str, Any],
                     verify_rows: Sequence[dict[str, Any]], inputs: StudyInputs, steps: int = 16) -> float:
    """Per-step time of the decode loop beyond the verify forward: the loop run with a drafter that never
    proposes (one token per step), minus the verify curve's one-token time. Calibrates the cost model for the
    Python work around each forward (acceptance, cache bookkeeping) on this device."""
    import time

    from policies.drafters import PromptLookupDrafter
    from policies.speculative import speculative_generate
    from profilers.timing import synchronize
    from search_spaces.speculative_profiler import VerifyCurve

    ids = inputs.timing_ids(tokenizer, int(workload["prompt_tokens"]), device)
    never = PromptLookupDrafter(min_ngram=10**9, max_ngram=10**9)

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        speculative_generate(model, ids, n, never)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    run(steps + 1)
    per_step = statistics.median((run(steps + 1) - run(1)) / steps for _ in range(3))
    kv = int(workload["prompt_tokens"]) + steps / 2
    return max(0.0, per_step - VerifyCurve(verify_rows).ms(1, kv))


# -- calibration -----------------------------------------------------------------------------------------------
def calibration_sequences(model: Any, tokenizer: Any, device: torch.device, workload: dict[str, Any],
                          inputs: StudyInputs, n_new: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt, target greedy continuation) pairs: the workload's timing prompt, a needle and a pattern
    prompt and a free-text (code) prompt (all from the tuner's `inputs`). Acceptance is measured on the
    target's own continuations, the text speculative decoding actually verifies."""
    n_new = n_new or max(32, int(workload["new_tokens"]))
    prompts = [inputs.timing_ids(tokenizer, int(workload["prompt_tokens"]), device)]
    for task in ("needle", "pattern"):
        example = inputs.task_examples(task, 1, seed=7)[0]
        prompts.append(tokenizer(example.prompt, return_tensors="pt").input_ids.to(device))
    prompts.append(tokenizer(inputs.calibration_texts(1, seed=7, n_chars=800)[0],
                             return_tensors="pt").input_ids.to(device))
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id or 0)
            out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist()))
    return out


def rank_acceptance(lm: Any, sequences: Sequence[tuple[list[int], list[int]]], max_rank: int = MAX_RANK) -> list[float]:
    """acc[r] = how often the target's greedy token is the draft's rank-r token, teacher-forced over the
    continuations (Sequoia's positional acceptance vector for greedy decoding)."""
    counts = [0] * max_rank
    total = 0
    device = next(lm.parameters()).device
    with torch.inference_mode():
        for prompt, continuation in sequences:
            ids = torch.tensor([prompt + continuation], device=device)
            logits = lm(ids).logits[0, len(prompt) - 1:-1].float()
            target = torch.tensor(continuation, device=device)
            ranks = (logits > logits.gather(1, target[:, None])).sum(1)
            for r in ranks.tolist():
                if r < max_rank:
                    counts[r] += 1
            total += len(continuation)
    return [c / max(total, 1) for c in counts]


def recycle_acceptance(model: Any, sequences: Sequence[tuple[list[int], list[int]]],
                       k: int = RECYCLE_K) -> list[float]:
    """Positional acceptance of the token-recycling drafter, simulated on the target's greedy continuations:
    the rank of each next token in the table row of the token before it, where the table holds the target's
    top-k after the latest earlier occurrence of each token (what the drafter would have recycled then)."""
    counts = [0] * k
    total = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for prompt, continuation in sequences:
            full = prompt + continuation
            top = model(torch.tensor([full], device=device)).logits[0].topk(k, dim=-1).indices.tolist()
            table: dict[int, list[int]] = {}
            for pos in range(len(prompt)):  # the prefill's rows
                table[full[pos]] = top[pos]
            for t in range(len(prompt) + 1, len(full)):
                # drafting full[t] from the root full[t-1], which the target has not run yet
                row = table.get(full[t - 1])
                if row is not None and full[t] in row:
                    counts[row.index(full[t])] += 1
                total += 1
                table[full[t - 1]] = top[t - 1]
    return [c / max(total, 1) for c in counts]


def lookup_simulation(drafter: Any, sequences: Sequence[tuple[list[int], list[int]]]) -> tuple[float, float]:
    """(mean tokens per step, mean tree size) of a prompt-lookup drafter, simulated exactly on the target's
    greedy continuations (greedy acceptance depends only on them)."""
    steps, tokens, sizes = 0, 0, []
    for prompt, continuation in sequences:
        t = 1  # the first token comes from the prefill
        while t < len(continuation):
            draft = drafter.propose(prompt + continuation[:t])
            accepted = _greedy_path(draft.parents, draft.tokens, continuation[t:])
            steps += 1
            tokens += accepted + 1
            sizes.append(len(draft.tokens))
            t += accepted + 1
    return (tokens / steps if steps else 1.0), (statistics.mean(sizes) if sizes else 0.0)


def _greedy_path(parents: Sequence[int], tokens: Sequence[int], truth: Sequence[int]) -> int:
    """Length of the longest root path of the tree that spells a prefix of `truth`."""
    from search_spaces.speculative_eagle import accepted_nodes

    return len(accepted_nodes(parents, tokens, truth))


register_search_space(SpeculativeSpace())
