"""Which floating-point precision a run computes in, and whether this machine computes bf16 natively.

bf16 autocast saves time and activation memory only on hardware that multiplies bf16 natively: on a CPU,
AVX-512 BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX (Intel Sapphire Rapids and later); on
CUDA, compute capability 8.0 (Ampere) and later. Without them bf16 gains nothing: an AVX-512 CPU emulates it with
conversions, and on an AVX2 CPU PyTorch has no bf16 matrix-product kernel at all and runs a generic one, many
times slower than fp32 (issue 14: 40x).

There `--precision bf16` runs in fp32 after saying so in one line, rather than being refused: bf16 is a speed
setting, not part of what a run computes (its losses differ from fp32's only by rounding), and the machines a
job lands on differ from one day to the next, so a command or script written on one must not fail on another.
`--precision auto` picks what the machine is fast at: bf16 where it is native, fp16 on CUDA GPUs older than
Ampere (tensor cores for fp16 only), fp32 otherwise.

The CPU check reads PyTorch's view of the CPU (`torch.backends.cpu.get_cpu_capability()` and the x86 feature
tests in `torch.cpu`); CPUs it has no test for (ARM) count as without native bf16. `BERTFORGE_CPU_BF16=1` (or
`0`) overrides the check, for a CPU it misjudges and to force bf16 anyway.
"""

from __future__ import annotations

import os

import torch

from bertforge.errors import BertforgeError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # what --precision accepts
OVERRIDE_ENV = "BERTFORGE_CPU_BF16"


def cpu_bf16_units() -> list[str]:
    """The bf16 units PyTorch finds on this CPU: "AVX512_BF16", "AMX" (x86 tests; none on other CPUs)."""
    tests = (("AVX512_BF16", torch.cpu._is_avx512_bf16_supported), ("AMX", torch.cpu._is_amx_tile_supported))
    return [name for name, present in tests if present()]


def cpu_capability() -> str:
    """PyTorch's CPU capability plus the bf16 units it reports, e.g. "AVX512+AVX512_BF16+AMX" or "AVX2"."""
    return "+".join([torch.backends.cpu.get_cpu_capability(), *cpu_bf16_units()])


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (module docstring); BERTFORGE_CPU_BF16 decides for a CPU when set."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    override = os.environ.get(OVERRIDE_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise BertforgeError(f"{OVERRIDE_ENV} must be 1 (this CPU computes bf16 natively) or 0, got {override!r}")
        return override == "1"
    return bool(cpu_bf16_units())


def fastest_precision(device: torch.device) -> str:
    """The precision `device` trains fastest in: bf16 where native, fp16 on older CUDA GPUs, else fp32."""
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a run asked for `requested` (one of PRECISIONS) computes in on `device`.

    `auto` is `fastest_precision(device)`; bf16 on a CPU without native bf16 is fp32; fp16 off CUDA is refused
    (it needs a grad scaler, which PyTorch provides for CUDA); otherwise `requested` itself.
    """
    if requested not in PRECISIONS:
        raise BertforgeError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return fastest_precision(device)
    if requested == "fp16" and device.type != "cuda":
        raise BertforgeError("--precision fp16 needs a CUDA device (it relies on a grad scaler); "
                             "use --precision bf16 on the CPU")
    if requested == "bf16" and device.type == "cpu" and not native_bf16(device):
        return "fp32"
    return requested


def machine(device: torch.device) -> str:
    """The device in a few words: "cpu AVX512+AVX512_BF16" or "cuda NVIDIA H100 80GB HBM3"."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"{device.type} {cpu_capability()}"


def describe(requested: str, device: torch.device) -> str:
    """One line for the start of a run: the precision it computes in, on what, and why when not as asked."""
    resolved = resolve_precision(requested, device)
    if requested == "bf16" and resolved != "bf16":
        cpu = cpu_capability() + (f"; {OVERRIDE_ENV}=0" if os.environ.get(OVERRIDE_ENV) == "0" else "")
        return (f"bertforge: --precision bf16 computes in fp32 here: this CPU ({cpu}) has no native bf16 "
                f"(AVX512_BF16 or AMX), without which bf16 runs many times slower ({OVERRIDE_ENV}=1 forces bf16)")
    chosen = " (auto)" if requested == "auto" else ""
    return f"bertforge: precision {resolved}{chosen} on {machine(device)}"


def machine_record(requested: str, device: torch.device) -> dict[str, str]:
    """What a run's record keeps of its machine: the device, the CPU capability and the precision computed in."""
    return {"device": device.type, "cpu_capability": cpu_capability(),
            "precision": resolve_precision(requested, device)}
