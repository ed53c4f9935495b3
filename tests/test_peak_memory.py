"""CPU peak memory: the tensor tracker counts fresh allocations, subtracts frees, ignores views, and reads the
same on every call (the resident-set reading it replaced said 0 MB once pages were reused)."""

from __future__ import annotations

import torch

from policies.testing import tiny_llama
from profilers.peak_memory import PeakMemory
from tuner.measure import peak_memory_of

MIB = 2**20


def test_fresh_tensors_count_frees_are_subtracted_views_are_free():
    keep = torch.zeros(MIB // 4)  # allocated before the block: not the block's
    with PeakMemory("cpu") as mem:
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        view = a[: MIB // 8].view(2, -1).t()  # views share a's storage
        keep.add_(1.0)  # in place: no new storage
        del a, view
        b = torch.ones(MIB // 2)  # 2 MiB, after a was freed
        c = b * 2  # 2 MiB more, alive together with b
        del b, c
    assert mem.kind == "cpu_peak_tensors"
    assert mem.peak_mb == 4.0


def test_the_reading_repeats_and_grows_with_the_prompt():
    model = tiny_llama(layers=2)

    def generate(ids, **kwargs):
        return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)

    short, long = torch.randint(1, 256, (1, 64)), torch.randint(1, 256, (1, 256))
    cpu = torch.device("cpu")
    first = peak_memory_of(generate, short, 4, cpu)
    again = peak_memory_of(generate, short, 4, cpu)
    longer = peak_memory_of(generate, long, 4, cpu)
    assert first.kind == "cpu_peak_tensors"
    assert first.peak_mb is not None and first.peak_mb > 0
    assert again.peak_mb == first.peak_mb  # deterministic: the same ops allocate the same tensors
    assert longer.peak_mb > first.peak_mb  # a longer prompt: larger activations and KV cache


def test_growth_in_place_counts_and_freed_addresses_are_new_storages():
    with PeakMemory("cpu") as mem:
        grown = torch.empty(0).resize_(MIB // 4)  # 1 MiB grown inside an existing (empty) storage
        out = torch.empty(0)
        torch.cat([grown, grown], out=out)  # out= grows `out` to 2 MiB
        del grown, out
        again = torch.ones(MIB // 4)  # may reuse a freed address: still a fresh 1 MiB
        del again
    assert mem.peak_mb == 3.0


def test_other_devices_are_not_measured():
    mem = PeakMemory("meta")
    with mem:
        torch.ones(4, device="meta")
    assert mem.kind == "unavailable" and mem.peak_mb is None
