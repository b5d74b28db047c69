"""Compilation targets: a name a user types -> a TVM target (JSON dict form, TVM 0.27).

``host`` detects the running CPU (LLVM's name for it, so AVX2/AVX-512/AMX are used where present).
Named x86-64 targets pin an ISA level so a library built here runs on older machines:
``x86-64-avx2`` (Haswell and later) and ``x86-64-avx512`` (Skylake-SP and later); ``x86-64`` is the
baseline (SSE2). A target's ``isa`` field is what the kernels of csrc/ dispatch on.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from ..errors import UsageError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    tvm: dict = field(hash=False)
    isa: str  # "avx512" | "avx2" | "sse2" | "neon" | "cuda"

    @property
    def device_type(self) -> str:
        return "cuda" if self.tvm.get("kind") == "cuda" else "cpu"
    cross_cc: str | None = None  # C++ cross compiler that links the library (None: the host's)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm)


def _host_triple() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, f"{machine}-linux-gnu")


def host_cpu_flags() -> set[str]:
    """CPU feature flags of this machine from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host() -> TargetSpec:
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu())
    mcpu = str(detected.attrs.get("mcpu", "")) or "generic"
    flags = host_cpu_flags()
    if platform.machine() == "aarch64":
        isa = "neon"
    elif {"avx512f", "avx512bw", "avx512vl"} <= flags:
        isa = "avx512"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "sse2"
    num_cores = _physical_cores()
    spec = {"kind": "llvm", "mtriple": _host_triple(), "mcpu": mcpu, "num-cores": num_cores}
    return TargetSpec("host", f"this machine ({mcpu}, {isa})", spec, isa)


def _physical_cores() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)))


def _x86(name: str, mcpu: str, isa: str, desc: str) -> TargetSpec:
    return TargetSpec(name, desc, {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}, isa)


_FIXED = {
    "x86-64": lambda: _x86("x86-64", "x86-64", "sse2", "any x86-64 CPU (SSE2 baseline)"),
    "x86-64-avx2": lambda: _x86("x86-64-avx2", "haswell", "avx2", "x86-64 with AVX2+FMA (Haswell and later)"),
    "x86-64-avx512": lambda: _x86(
        "x86-64-avx512", "skylake-avx512", "avx512", "x86-64 with AVX-512 (Skylake-SP and later)"
    ),
}

CUDA_ARCHS = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_CUDA_ARCH = "sm_80"


def _cuda(arch: str | None = None) -> TargetSpec:
    """NVIDIA GPU through TVM's CUDA codegen (kernels compiled by nvcc at build time); the host
    side of the library is built for this machine's CPU."""
    arch = arch or DEFAULT_CUDA_ARCH
    if arch not in CUDA_ARCHS:
        raise UsageError(f"--arch '{arch}' is not supported for cuda; choose one of: {', '.join(CUDA_ARCHS)}")
    host = {"kind": "llvm", "mtriple": _host_triple()}
    spec = {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32, "host": host}
    return TargetSpec("cuda", f"NVIDIA GPU ({arch})", spec, "cuda")


AARCH64_CC = "aarch64-linux-gnu-g++"


def _aarch64(cpu: str | None = None) -> TargetSpec:
    """64-bit Arm Linux boards (NEON), cross-compiled with aarch64-linux-gnu-g++.
    ``cpu`` (``--cpu``) tunes for a core, e.g. cortex-a53, cortex-a72, cortex-a76, neoverse-n1."""
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if cpu:
        spec["mcpu"] = cpu
    desc = f"aarch64 Linux with NEON{' (' + cpu + ')' if cpu else ''}"
    native = platform.machine() == "aarch64"
    return TargetSpec("aarch64", desc, spec, "neon", cross_cc=None if native else AARCH64_CC)


TARGETS = {"host": _host, **_FIXED, "aarch64": _aarch64, "cuda": _cuda}


def get_target(name: str, arch: str | None = None, cpu: str | None = None) -> TargetSpec:
    """Look a target up by name; an unknown name is a usage error that lists the choices.
    ``arch`` selects the GPU architecture of GPU targets (``--arch``), ``cpu`` the Arm core of
    the aarch64 target (``--cpu``)."""
    if name not in TARGETS:
        raise UsageError(f"--target '{name}' is not known; choose one of: {', '.join(TARGETS)}")
    if arch is not None and name != "cuda":
        raise UsageError(f"--arch applies to GPU targets only, not to '{name}'")
    if cpu is not None and name != "aarch64":
        raise UsageError(f"--cpu applies to the aarch64 target only, not to '{name}'")
    if name == "cuda":
        return _cuda(arch)
    if name == "aarch64":
        return _aarch64(cpu)
    return TARGETS[name]()


def target_names() -> list[str]:
    return list(TARGETS)
