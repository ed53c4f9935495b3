"""Device fingerprints and timers: ids from fabricated names, UUID matching with fake NVML records,
and the real CPU of whatever machine runs the tests."""

from __future__ import annotations

import json
import random

import pytest
import torch

from profilers import device as dev_mod
from profilers.device import (
    DeviceFingerprint,
    cpu_device_id,
    cpu_fingerprint,
    cuda_device_id,
    cuda_fingerprints_from_records,
    current_cpu,
    list_devices,
    normalize_uuid,
    parse_cpuinfo,
    resolve_device,
    torch_device,
)
from profilers.timing import TimingResult, synchronize, time_callable

# --------------------------------------------------------------------------------------------------
# ids


@pytest.mark.parametrize(
    ("model", "threads", "expected"),
    [
        ("Intel(R) Xeon(R) Platinum 8488C", 2, "cpu-intel-xeon-platinum-8488c-2t"),
        ("Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", 6, "cpu-intel-core-i7-8700k-6t"),
        ("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", 4, "cpu-intel-xeon-e5-2686-v4-4t"),
        ("AMD EPYC 7763 64-Core Processor", 64, "cpu-amd-epyc-7763-64t"),
        ("AMD Ryzen 7 7840U w/ Radeon 780M Graphics", 8, "cpu-amd-ryzen-7-7840u-8t"),
        ("Apple M2 Max", 12, "cpu-apple-m2-max-12t"),
        ("Intel(R) Xeon(R) Processor", 2, "cpu-intel-xeon-2t"),
        ("  ", 1, "cpu-unknown-1t"),
    ],
)
def test_cpu_device_id_slugs(model: str, threads: int, expected: str) -> None:
    assert cpu_device_id(model, threads) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H200", "nvidia-h200"),
        ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
    ],
)
def test_cuda_device_id_slugs(name: str, expected: str) -> None:
    assert cuda_device_id(name) == expected


def test_ids_are_filename_safe() -> None:
    for raw in ["Weird/CPU\\name (TM) ** 9000 @ 1GHz", "ÄMD ✓ thing", "a--b__c"]:
        ident = cpu_device_id(raw, 3)
        assert all(c.isalnum() and c.islower() or c.isdigit() or c == "-" for c in ident), ident
        assert "--" not in ident and not ident.endswith("-")


def test_normalize_uuid_matches_nvml_and_torch_forms() -> None:
    torch_form = "8f3c2a10-1b2c-4d5e-9f00-112233445566"
    assert normalize_uuid("GPU-8F3C2A10-1B2C-4D5E-9F00-112233445566") == normalize_uuid(torch_form)
    assert normalize_uuid(b"GPU-8f3c2a10-1b2c-4d5e-9f00-112233445566") == normalize_uuid(torch_form)
    assert normalize_uuid("MIG-8f3c2a10-1b2c-4d5e-9f00-112233445566") != normalize_uuid(torch_form)
    assert normalize_uuid(None) == ""


# --------------------------------------------------------------------------------------------------
# CUDA fingerprints from fabricated records


def _uuid(i: int) -> str:
    return f"{i:08x}-aaaa-bbbb-cccc-{i:012x}"


def _fake_records(n_torch: int = 3, n_nvml: int = 5, seed: int = 0):
    """Torch sees ``n_torch`` of ``n_nvml`` GPUs (CUDA_VISIBLE_DEVICES=3,0,4-style), NVML lists all of
    them in its own shuffled order; each GPU has distinct clocks so a wrong match is visible."""
    rng = random.Random(seed)
    nvml = [
        {
            "nvml_index": i,
            "name": "NVIDIA H100 80GB HBM3" if i % 2 == 0 else "NVIDIA A100-SXM4-80GB",
            "uuid": "GPU-" + _uuid(100 + i).upper(),
            "memory_total_mb": 81559.0,
            "max_sm_clock_mhz": 1000 + i,
            "max_memory_clock_mhz": 2000 + i,
            "power_limit_w": 300.0 + i,
        }
        for i in range(n_nvml)
    ]
    visible = rng.sample(range(n_nvml), n_torch)
    torch_recs = [
        {
            "index": t,
            "name": nvml[g]["name"],
            "uuid": _uuid(100 + g),
            "compute_capability": "9.0",
            "memory_total_mb": 81000.0,
        }
        for t, g in enumerate(visible)
    ]
    shuffled = nvml[:]
    rng.shuffle(shuffled)
    return torch_recs, shuffled, visible


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cuda_fingerprints_match_nvml_by_uuid(seed: int) -> None:
    torch_recs, nvml, visible = _fake_records(seed=seed)
    system = {"driver_version": "550.54.15", "cuda_driver_version": "12.4"}
    fps = cuda_fingerprints_from_records(torch_recs, (nvml, system), torch_version="2.13.0", torch_cuda_version="12.4")
    assert [fp.index for fp in fps] == [0, 1, 2]  # torch order, not NVML order
    for fp, g in zip(fps, visible, strict=True):
        assert fp.kind == "cuda"
        assert fp.fields["max_sm_clock_mhz"] == 1000 + g
        assert fp.fields["max_memory_clock_mhz"] == 2000 + g
        assert fp.fields["power_limit_w"] == 300.0 + g
        assert normalize_uuid(fp.fields["uuid"]) == normalize_uuid(_uuid(100 + g))
        assert fp.fields["nvml"] is True
        assert fp.fields["driver_version"] == "550.54.15"
        assert fp.fields["cuda_version"] == "12.4"
        assert fp.fields["cuda_driver_version"] == "12.4"
        assert fp.fields["compute_capability"] == "9.0"
        assert fp.id == cuda_device_id(fp.name)


def test_cuda_fingerprints_without_nvml_keep_torch_fields() -> None:
    torch_recs, _, _ = _fake_records()
    fps = cuda_fingerprints_from_records(torch_recs, None, torch_cuda_version="12.4")
    assert len(fps) == 3
    for fp in fps:
        assert fp.fields["nvml"] is False
        assert fp.fields["max_sm_clock_mhz"] is None
        assert fp.fields["memory_total_mb"] == 81000.0  # torch's number
        assert fp.fields["uuid"].startswith("GPU-")
        assert set(fp.to_dict()) >= {
            "id", "kind", "name", "index", "uuid", "compute_capability", "memory_total_mb",
            "max_sm_clock_mhz", "max_memory_clock_mhz", "power_limit_w", "driver_version",
            "cuda_version", "torch_version",
        }  # fmt: skip


def test_resolve_cuda_specs_with_fabricated_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    torch_recs, nvml, _ = _fake_records()
    monkeypatch.setattr(dev_mod, "probe_torch_cuda", lambda: torch_recs)
    monkeypatch.setattr(dev_mod, "probe_nvml", lambda: (nvml, {"driver_version": "1"}))
    devices = list_devices()
    assert [d.kind for d in devices] == ["cuda", "cuda", "cuda", "cpu"]
    assert resolve_device(None).index == 0
    assert resolve_device("cuda").index == 0
    assert resolve_device("cuda:2").index == 2
    assert resolve_device(devices[1].id).kind == "cuda"
    assert torch_device(resolve_device("cuda:1")) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 3 CUDA"):
        resolve_device("cuda:7")


def test_resolve_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev_mod, "probe_torch_cuda", lambda: [])
    assert resolve_device(None).kind == "cpu"
    with pytest.raises(ValueError, match="no CUDA device") as exc:
        resolve_device("cuda:0")
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# CPU


_X86_CPUINFO = "".join(
    f"processor\t: {p * 4 + c * 2 + t}\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
    f"physical id\t: {p}\ncore id\t\t: {c}\n"
    "flags\t\t: fpu sse2 fma avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 hypervisor\n\n"
    for p in range(2)
    for c in range(2)
    for t in range(2)
)
_ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve sve2 bf16 i8mm\nCPU part\t: 0xd4f\n\n"


def test_parse_cpuinfo_x86_and_arm() -> None:
    x86 = parse_cpuinfo(_X86_CPUINFO)
    assert x86["model"] == "Intel(R) Xeon(R) Platinum 8488C"
    assert x86["cores_physical"] == 4  # 2 sockets x 2 cores, hyperthreads not counted
    assert x86["flags"] == ["fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    arm = parse_cpuinfo(_ARM_CPUINFO)
    assert arm["model"] is None and arm["cores_physical"] is None
    assert {"neon", "sve", "sve2", "bf16", "i8mm"} <= set(arm["flags"])
    assert parse_cpuinfo("") == {"model": None, "cores_physical": None, "flags": []}


def test_current_cpu_from_fabricated_cpuinfo() -> None:
    fp = current_cpu(cpuinfo_text=_X86_CPUINFO, threads=16)
    assert fp.id == "cpu-intel-xeon-platinum-8488c-16t"
    assert fp.kind == "cpu" and fp.index is None
    assert fp.fields["torch_threads"] == 16 and fp.fields["cores_physical"] == 4
    assert "amx_tile" in fp.fields["flags"]


def test_list_devices_on_this_machine_has_a_cpu_with_flags() -> None:
    devices = list_devices()
    assert devices and devices[-1].kind == "cpu"
    assert all(d.kind == "cuda" for d in devices[:-1])
    cpu = devices[-1].to_dict()
    assert cpu["id"].startswith("cpu-") and cpu["id"].endswith(f"-{torch.get_num_threads()}t")
    for key in ("model", "cores_physical", "cores_logical", "torch_threads", "flags", "torch_version"):
        assert key in cpu
    assert isinstance(cpu["flags"], list)
    text = dev_mod.read_cpuinfo() + " "
    if " avx2 " in text or " asimd " in text:
        assert cpu["flags"], "this CPU advertises SIMD flags; the fingerprint should list them"
    json.dumps([d.to_dict() for d in devices])  # JSON-ready
    assert resolve_device("cpu").id == cpu["id"]
    assert resolve_device(cpu["id"]).id == cpu["id"]
    assert resolve_device(cpu["id"].upper()).id == cpu["id"]


def test_resolve_unknown_device_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError) as exc:
        resolve_device("nope")
    msg = str(exc.value)
    assert "nope" in msg and "\n" not in msg


def test_fingerprint_round_trip_and_flat_dict() -> None:
    fp = cpu_fingerprint("AMD EPYC 7763 64-Core Processor", threads=8, cores_physical=64, flags=["avx2"])
    d = fp.to_dict()
    assert d["id"] == "cpu-amd-epyc-7763-8t" and d["kind"] == "cpu" and d["flags"] == ["avx2"]
    assert "fields" not in d
    back = DeviceFingerprint.from_dict(d)
    assert back == fp
    assert DeviceFingerprint.from_dict(json.loads(json.dumps(d))) == fp
    with pytest.raises(ValueError, match="missing"):
        DeviceFingerprint.from_dict({"kind": "cpu"})
    with pytest.raises(ValueError, match="kind"):
        DeviceFingerprint.from_dict({"id": "x", "kind": "tpu", "name": "x"})
    assert torch_device(fp) == torch.device("cpu")


def test_probe_nvml_never_raises() -> None:
    out = dev_mod.probe_nvml()
    assert out is None or (isinstance(out, tuple) and len(out) == 2)


# --------------------------------------------------------------------------------------------------
# timing


def test_time_callable_cpu() -> None:
    calls = []
    res = time_callable(lambda: calls.append(sum(range(2000))), "cpu", warmup=2, repeats=5)
    assert isinstance(res, TimingResult)
    assert len(calls) == 7 and len(res.samples_ms) == 5
    assert res.min_ms <= res.median_ms <= max(res.samples_ms)
    assert res.median_ms > 0
    synchronize("cpu")
    synchronize(torch.device("cpu"))
    with pytest.raises(ValueError):
        time_callable(lambda: None, "cpu", repeats=0)
