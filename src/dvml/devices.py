"""Device choice, the one rule every stage uses: ``auto`` = CUDA, then Apple-silicon MPS, then the CPU.

``resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps") -> torch.device``. Asking for a device that is
not there is a :class:`~dvml.errors.DvmlError` naming the option and what is available instead.

Device-dependent choices live here too, so code paths stay free of CUDA-only calls where MPS has an
equivalent: :func:`autocast_dtype` (float16 on CUDA and MPS, none on the CPU) and :func:`pin_memory`
(pinned host memory helps CUDA copies only).

torch is imported where a device is resolved, so that :func:`check_device_name` (used by the configs) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dvml.errors import DvmlError, FieldError

if TYPE_CHECKING:
    import torch


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available() -> list[str]:
    """Devices usable here, e.g. ``["cuda", "cpu"]``."""
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if mps_available() else []) + ["cpu"]


def check_device_name(name: str, option: str = "`device`") -> None:
    """Validate the spelling (not the availability) of a device choice; ValueError naming ``option``."""
    name = str(name)
    if name in ("auto", "cpu", "cuda", "mps"):
        return
    if name.startswith("cuda:") and name[5:].isdigit():
        return
    raise FieldError(f"{option} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_device(name: str | torch.device = "auto", option: str = "`device`") -> torch.device:
    """The torch device for a choice: ``auto`` picks cuda, then mps, then cpu.

    Raises:
        DvmlError: the named device is not available here (the message lists what is).
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    check_device_name(name, option)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DvmlError(f"{option} {name}: CUDA is not available here (available: {', '.join(available())})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DvmlError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not mps_available():
        raise DvmlError(f"{option} mps: Apple-silicon MPS is not available here "
                        f"(available: {', '.join(available())})")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for inference on ``device``: float16 on CUDA and MPS, None (off) on the CPU."""
    import torch

    return torch.float16 if device.type in ("cuda", "mps") else None


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin host memory (CUDA only; MPS shares memory)."""
    return device.type == "cuda"
