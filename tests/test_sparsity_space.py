"""The sparsity search space: OWL allocation, presets, and `autotune tune --techniques sparsity` end to end."""

from __future__ import annotations

import pytest

from policies.sparsity import SparsityConfig
from search_spaces.sparsity import owl_levels
from tuner.quality import QualityConfig
from tuner.tune import TuneConfig, tune
from tuner.workload import Workload


def test_owl_gives_outlier_heavy_layers_less_sparsity_and_keeps_the_mean():
    levels = owl_levels([0.01, 0.05, 0.03, 0.01], level=0.5, lam=0.1)
    assert sum(levels) / 4 == pytest.approx(0.5)
    assert levels[1] == min(levels) and levels[0] == levels[3] == max(levels)
    assert max(levels) - min(levels) == pytest.approx(0.2)
    assert owl_levels([0.02] * 3, 0.4, 0.1) == [0.4] * 3


def test_tune_writes_a_valid_sparsity_policy_with_teal_presets_first(tmp_path):
    import pandas as pd

    result = tune(TuneConfig(model="builtin:tiny", techniques=("sparsity",), budget=3, out_dir=tmp_path,
                             workload=Workload(prompt_tokens=64, new_tokens=4), repeats=1,
                             quality=QualityConfig(tasks=("pattern",), examples_per_task=3, free_text_samples=1,
                                                   free_text_chars=400)))
    section = result.policy["techniques"]["sparsity"]
    assert SparsityConfig.section_problems(section) == [] and len(section["thresholds"]) == 6
    trials = pd.read_csv(result.artefacts_dir / "trials.csv")
    assert list(trials["preset"][:2]) == ["sparsity:teal-40", "sparsity:teal-50"]


def test_kernels_are_chosen_from_the_device_profile():
    from search_spaces.sparsity import choose_kernels

    def rows(group, s, dense, ebag):
        return [{"layer": 0, "group": group, "sparsity": s, "kernel": "dense", "us": dense},
                {"layer": 0, "group": group, "sparsity": s, "kernel": "embedding_bag_mv", "us": ebag},
                {"layer": 0, "group": group, "sparsity": s, "kernel": "gather_mv", "us": 99.0}]

    profile = rows("gate_up", 0.5, 10.0, 12.0) + rows("gate_up", 0.7, 10.0, 8.0) + rows("down", 0.7, 10.0, 11.0)
    # gate_up at 0.75 reads the 0.7 point (sparse wins); at 0.6 the 0.5 point (dense wins); down never wins;
    # qkv has no profile; level 0 is dense whatever the profile says.
    assert choose_kernels(profile, [[0.8, 0.0, 0.75, 0.9]]) == [["dense", "dense", "embedding_bag_mv", "dense"]]
    assert choose_kernels(profile, [[0.0, 0.0, 0.6, 0.0]]) == [["dense", "dense", "dense", "dense"]]
