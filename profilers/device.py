"""Device fingerprints: what hardware a profile or a policy was measured on.

A policy file is only valid for the device it was tuned on, so every profile and policy carries a
``DeviceFingerprint`` whose ``id`` doubles as a stable, filename-safe key (``nvidia-h100-80gb-hbm3``,
``cpu-intel-xeon-platinum-8488c-2t``).  The ``id`` deliberately contains only what changes the
measured numbers *class-wide* (GPU model; CPU model and the torch thread count), not serial numbers,
so that two identical machines share policy files.

Probing is split into small pieces so tests can fabricate any machine:

* pure functions: :func:`slugify`, :func:`cpu_device_id`, :func:`cuda_device_id`,
  :func:`parse_cpuinfo`, :func:`normalize_uuid`, :func:`cpu_fingerprint`,
  :func:`cuda_fingerprints_from_records` (matches torch and NVML records by UUID);
* probes that touch the machine, looked up at call time so ``monkeypatch.setattr`` works:
  :func:`read_cpuinfo`, :func:`probe_torch_cuda`, :func:`probe_nvml`.

NVML (``pynvml`` from the nvidia-ml-py package) is optional: any import or call failure simply means
"no NVML", and CUDA fingerprints then fall back to what torch knows.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "CPU_FLAGS",
    "DeviceFingerprint",
    "cpu_device_id",
    "cpu_fingerprint",
    "cuda_device_id",
    "cuda_fingerprints_from_records",
    "current_cpu",
    "list_cuda_devices",
    "list_devices",
    "normalize_uuid",
    "parse_cpuinfo",
    "probe_nvml",
    "probe_torch_cuda",
    "read_cpuinfo",
    "resolve_device",
    "slugify",
    "torch_device",
]

DeviceKind = Literal["cpu", "cuda"]

#: CPU feature flags that matter for inference kernels (x86 names as in /proc/cpuinfo; ``neon``,
#: ``sve``, ``sve2``, ``bf16``, ``i8mm`` on arm).  Only these are recorded, so fingerprints stay short
#: and comparable across kernel versions that print different flag sets.
CPU_FLAGS: tuple[str, ...] = (
    "fma",
    "f16c",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


@dataclass(frozen=True)
class DeviceFingerprint:
    """One device as profiles and policies record it.

    ``fields`` holds the kind-specific details (see ``docs/INTERFACES.md``); ``to_dict`` flattens them
    next to ``id``/``kind``/``name``/``index`` because that is the shape written into YAML and JSON.
    """

    id: str
    kind: DeviceKind
    name: str
    index: int | None = None
    fields: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON/YAML-ready dict: ``{"id", "kind", "name", "index", **fields}``."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "name": self.name, "index": self.index}
        for key, value in self.fields.items():
            if key not in out:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceFingerprint:
        """Inverse of :meth:`to_dict`; unknown keys land in ``fields`` (forward compatible)."""
        missing = [k for k in ("id", "kind", "name") if k not in d]
        if missing:
            raise ValueError(f"device fingerprint is missing {', '.join(missing)}")
        kind = d["kind"]
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device fingerprint kind must be 'cpu' or 'cuda', got {kind!r}")
        index = d.get("index")
        rest = {k: v for k, v in d.items() if k not in ("id", "kind", "name", "index")}
        return cls(
            id=str(d["id"]),
            kind=kind,
            name=str(d["name"]),
            index=None if index is None else int(index),
            fields=rest,
        )

    @property
    def torch_spec(self) -> str:
        """``"cpu"`` or ``"cuda:N"``: what to hand to ``torch.device``."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index or 0}"


# --------------------------------------------------------------------------------------------------
# ids and slugs (pure)

# Marketing noise that does not distinguish one CPU model from another: trademark marks, the nominal
# frequency ("CPU @ 2.40GHz"), and the generic words "processor"/"cpu"/"N-core".
_NOISE_PATTERNS = (
    r"\((?:r|tm|c)\)",
    r"@\s*[\d.]+\s*[gm]hz",
    r"\b\d+(?:\.\d+)?\s*[gm]hz\b",
    r"\b\d+-core\b",
    r"\bprocessor\b",
    r"\bcpu\b",
    r"\b(?:w/|with)\s+radeon\b.*$",  # APU names append the iGPU
)


def slugify(text: str) -> str:
    """Lowercase ``[a-z0-9-]`` slug with single dashes and no dashes at either end."""
    s = text.lower()
    s = re.sub(r"[^a-z0-9]+", "-", s)
    s = re.sub(r"-{2,}", "-", s).strip("-")
    return s


def _cpu_model_slug(model_name: str) -> str:
    s = model_name.lower()
    for pattern in _NOISE_PATTERNS:
        s = re.sub(pattern, " ", s)
    slug = slugify(s)
    return slug or "unknown"


def cpu_device_id(model_name: str, threads: int) -> str:
    """``cpu-<model-slug>-<threads>t``: the thread count is part of the id because CPU latency scales
    with it, so a profile taken with 2 threads must not be reused at 32."""
    return f"cpu-{_cpu_model_slug(model_name)}-{int(threads)}t"


def cuda_device_id(name: str) -> str:
    """Slug of the GPU name, e.g. ``"NVIDIA H100 80GB HBM3"`` -> ``nvidia-h100-80gb-hbm3``."""
    return slugify(name) or "cuda-unknown"


def normalize_uuid(uuid: Any) -> str:
    """Canonical form for matching NVML and torch UUIDs.

    NVML says ``"GPU-8f3c...-..."`` (bytes in old bindings), torch says ``"8f3c...-..."`` (an object whose
    ``str`` has no prefix); both become 32 lowercase hex digits (MIG UUIDs keep their ``mig-`` prefix
    so they never collide with a full GPU)."""
    if uuid is None:
        return ""
    if isinstance(uuid, bytes):
        uuid = uuid.decode("ascii", "replace")
    s = str(uuid).strip().lower()
    prefix = ""
    if s.startswith("gpu-"):
        s = s[4:]
    elif s.startswith("mig-"):
        prefix, s = "mig-", s[4:]
    return prefix + re.sub(r"[^0-9a-f]", "", s)


# --------------------------------------------------------------------------------------------------
# CPU


def read_cpuinfo() -> str:
    """Raw ``/proc/cpuinfo`` text, or ``""`` where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, physical core count and the relevant flags from ``/proc/cpuinfo`` text.

    Returns ``{"model": str | None, "cores_physical": int | None, "flags": list[str]}``.  ``cores_physical``
    counts distinct (physical id, core id) pairs; ``None`` when the file does not say (arm, VMs)."""
    model: str | None = None
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    phys = core = None
    for line in text.splitlines():
        if ":" not in line:
            if phys is not None and core is not None:
                cores.add((phys, core))
            phys = core = None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and model is None and value:
            model = value
        elif key in ("hardware", "cpu model") and model is None and value:
            model = value
        elif key in ("flags", "features"):
            flags.update(value.lower().split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
    if phys is not None and core is not None:
        cores.add((phys, core))
    if "asimd" in flags:  # arm64 kernels call NEON "asimd"
        flags.add("neon")
    return {
        "model": model,
        "cores_physical": len(cores) or None,
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def cpu_fingerprint(
    model_name: str | None,
    *,
    threads: int,
    cores_physical: int | None = None,
    cores_logical: int | None = None,
    flags: list[str] | None = None,
    torch_version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> DeviceFingerprint:
    """Build a CPU fingerprint from already-probed facts (pure, for tests and for :func:`current_cpu`)."""
    name = model_name or platform.machine() or "unknown"
    fields: dict[str, Any] = {
        "model": name,
        "cores_physical": cores_physical,
        "cores_logical": cores_logical,
        "torch_threads": int(threads),
        "flags": list(flags or []),
        "torch_version": torch_version if torch_version is not None else str(torch.__version__),
    }
    if extra:
        fields.update(extra)
    return DeviceFingerprint(id=cpu_device_id(name, threads), kind="cpu", name=name, index=None, fields=fields)


def current_cpu(cpuinfo_text: str | None = None, threads: int | None = None) -> DeviceFingerprint:
    """Fingerprint of this machine's CPU as torch will use it (``torch.get_num_threads()`` threads)."""
    info = parse_cpuinfo(read_cpuinfo() if cpuinfo_text is None else cpuinfo_text)
    model = info["model"] or platform.processor() or None
    flags = list(info["flags"])
    machine = platform.machine().lower()
    if not flags and machine in ("arm64", "aarch64"):
        flags = ["neon"]  # every arm64 core has NEON; macOS has no /proc/cpuinfo to say so
    extra: dict[str, Any] = {"arch": machine or None}
    try:
        extra["cores_available"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return cpu_fingerprint(
        model,
        threads=torch.get_num_threads() if threads is None else threads,
        cores_physical=info["cores_physical"],
        cores_logical=os.cpu_count(),
        flags=flags,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------------
# CUDA


def probe_torch_cuda() -> list[dict[str, Any]]:
    """One record per torch-visible CUDA device, in torch's index order.

    Keys: index, name, uuid, compute_capability, memory_total_mb.  Empty without CUDA."""
    try:
        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
    except Exception:  # a broken driver means "no CUDA" for fingerprinting
        return []
    records = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        records.append(
            {
                "index": i,
                "name": props.name,
                "uuid": str(getattr(props, "uuid", "") or ""),
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_total_mb": round(props.total_memory / 2**20, 1),
                "multiprocessor_count": getattr(props, "multi_processor_count", None),
            }
        )
    return records


def _nvml_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def probe_nvml() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """NVML's view: ``(per-device records in NVML order, system dict)``, or ``None`` without NVML.

    Each query is guarded on its own: MIG instances and some boards refuse clocks or power queries,
    which should cost that one field, not the whole fingerprint."""
    try:
        import pynvml  # optional, and slow to import where there is no driver
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU is the normal CPU-machine case
        return None

    def guard(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            return None

    try:
        system: dict[str, Any] = {}
        drv = guard(pynvml.nvmlSystemGetDriverVersion)
        system["driver_version"] = _nvml_str(drv) if drv is not None else None
        cuda_drv = guard(pynvml.nvmlSystemGetCudaDriverVersion)
        system["cuda_driver_version"] = (
            f"{cuda_drv // 1000}.{(cuda_drv % 1000) // 10}" if isinstance(cuda_drv, int) else None
        )
        records = []
        count = guard(pynvml.nvmlDeviceGetCount) or 0
        for i in range(count):
            h = guard(pynvml.nvmlDeviceGetHandleByIndex, i)
            if h is None:
                continue
            mem = guard(pynvml.nvmlDeviceGetMemoryInfo, h)
            power = guard(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
            if power is None:
                power = guard(pynvml.nvmlDeviceGetPowerManagementLimit, h)
            name = guard(pynvml.nvmlDeviceGetName, h)
            uuid = guard(pynvml.nvmlDeviceGetUUID, h)
            records.append(
                {
                    "nvml_index": i,
                    "name": _nvml_str(name) if name is not None else None,
                    "uuid": _nvml_str(uuid) if uuid is not None else None,
                    "memory_total_mb": round(mem.total / 2**20, 1) if mem is not None else None,
                    "max_sm_clock_mhz": guard(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
                    "max_memory_clock_mhz": guard(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
                    "power_limit_w": round(power / 1000.0, 1) if isinstance(power, (int, float)) else None,
                }
            )
        return records, system
    finally:
        guard(pynvml.nvmlShutdown)


def cuda_fingerprints_from_records(
    torch_records: list[dict[str, Any]],
    nvml: tuple[list[dict[str, Any]], dict[str, Any]] | None,
    *,
    torch_version: str | None = None,
    torch_cuda_version: str | None = None,
) -> list[DeviceFingerprint]:
    """Merge torch and NVML device records into fingerprints, in torch index order.

    Matching is by normalised UUID only: NVML enumerates every GPU on the box in PCI order while torch
    sees ``CUDA_VISIBLE_DEVICES`` in its own order, so indices cannot be trusted.  A torch device without
    an NVML twin keeps torch's fields and ``None`` for what only NVML knows."""
    nvml_records, system = nvml if nvml is not None else ([], {})
    by_uuid = {normalize_uuid(r.get("uuid")): r for r in nvml_records if r.get("uuid")}
    out = []
    for rec in torch_records:
        nv = by_uuid.get(normalize_uuid(rec.get("uuid"))) if rec.get("uuid") else None
        nv = nv or {}
        name = rec.get("name") or nv.get("name") or "cuda-unknown"
        uuid = nv.get("uuid") or (f"GPU-{rec['uuid']}" if rec.get("uuid") else None)
        fields: dict[str, Any] = {
            "uuid": uuid,
            "compute_capability": rec.get("compute_capability"),
            "memory_total_mb": nv.get("memory_total_mb") or rec.get("memory_total_mb"),
            "max_sm_clock_mhz": nv.get("max_sm_clock_mhz"),
            "max_memory_clock_mhz": nv.get("max_memory_clock_mhz"),
            "power_limit_w": nv.get("power_limit_w"),
            "driver_version": system.get("driver_version"),
            "cuda_version": torch_cuda_version if torch_cuda_version is not None else torch.version.cuda,
            "cuda_driver_version": system.get("cuda_driver_version"),
            "torch_version": torch_version if torch_version is not None else str(torch.__version__),
            "multiprocessor_count": rec.get("multiprocessor_count"),
            "nvml": bool(nv),
        }
        out.append(
            DeviceFingerprint(id=cuda_device_id(name), kind="cuda", name=name, index=int(rec["index"]), fields=fields)
        )
    return out


def list_cuda_devices() -> list[DeviceFingerprint]:
    """Fingerprints of the torch-visible CUDA devices (empty without CUDA)."""
    records = probe_torch_cuda()
    if not records:
        return []
    return cuda_fingerprints_from_records(records, probe_nvml())


# --------------------------------------------------------------------------------------------------
# public selection API


def list_devices() -> list[DeviceFingerprint]:
    """Every device autotune can profile on: CUDA devices first (torch index order), then the CPU."""
    return [*list_cuda_devices(), current_cpu()]


def resolve_device(spec: str | None = None) -> DeviceFingerprint:
    """Turn a user's ``--device`` value into a fingerprint.

    ``None`` -> ``cuda:0`` when CUDA is available else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
    device id as printed by ``autotune devices``.  Anything else raises ``ValueError`` with a one-line
    message listing what exists, so the CLI can print it as is."""
    if spec is None:
        cuda = list_cuda_devices()
        return cuda[0] if cuda else current_cpu()
    s = str(spec).strip()
    low = s.lower()
    if low in ("cpu", "cpu:0"):
        return current_cpu()
    threads = re.fullmatch(r"cpu:(\d+)t", low)
    here = current_cpu()
    if threads is None and low.startswith("cpu-") and low.rsplit("-", 1)[0] == here.id.rsplit("-", 1)[0]:
        threads = re.fullmatch(r".*-(\d+)t", low)  # this CPU's id with another thread count
    if threads is not None:
        return use_cpu_threads(int(threads.group(1)))
    m = re.fullmatch(r"cuda(?::(\d+))?", low)
    if m:
        cuda = list_cuda_devices()
        idx = int(m.group(1) or 0)
        if not cuda:
            raise ValueError(f"device {s!r}: no CUDA device is available on this machine (use 'cpu')")
        if idx >= len(cuda):
            raise ValueError(f"device {s!r}: only {len(cuda)} CUDA device(s) visible (cuda:0..cuda:{len(cuda) - 1})")
        return cuda[idx]
    devices = list_devices()
    for fp in devices:
        if fp.id == low:
            return fp
    known = ", ".join(["cpu", "cuda[:N]"] + [fp.id for fp in devices])
    raise ValueError(f"unknown device {s!r}; expected one of: {known}")


def use_cpu_threads(n: int) -> DeviceFingerprint:
    """Run torch on `n` CPU threads from now on (``--device cpu:Nt``) and return that device's fingerprint.

    The thread count is part of a CPU device id, so the same CPU at 1 and at 2 threads are two devices with
    their own profiles and policies."""
    if not 1 <= n <= (os.cpu_count() or 1):
        raise ValueError(f"device 'cpu:{n}t': thread count must be in 1..{os.cpu_count() or 1}")
    torch.set_num_threads(n)
    return current_cpu()


def torch_device(fp: DeviceFingerprint) -> torch.device:
    """The ``torch.device`` a fingerprint stands for."""
    if fp.kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", fp.index or 0)
