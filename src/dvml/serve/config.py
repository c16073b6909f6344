"""``dvml export``'s configuration, importable without torch (so that ``dvml export --help`` and its argument
errors stay fast): :class:`ExportConfig`, :class:`ExportFormat` and :func:`format_of` (the format is chosen by the
output file's suffix). :mod:`dvml.serve.export` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dvml.errors import FieldError


class ExportFormat(str, Enum):
    """Chosen by the output file's suffix."""

    exported = "torch.export"
    torchscript = "torchscript"
    onnx = "onnx"


SUFFIXES = {".pt2": ExportFormat.exported, ".pt": ExportFormat.torchscript, ".ts": ExportFormat.torchscript,
            ".onnx": ExportFormat.onnx}


def format_of(path: str | Path) -> ExportFormat:
    """``.pt2`` → torch.export, ``.pt`` / ``.ts`` → TorchScript, ``.onnx`` → ONNX; anything else is refused
    (ValueError)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; use .pt2 (torch.export), "
                         ".pt (TorchScript) or .onnx")
    return SUFFIXES[suffix]


@dataclass(frozen=True)
class ExportConfig:
    """What ``dvml export`` does: ``target`` (run directory, or a cache for its raw backbone) → ``out``."""

    target: Path
    out: Path
    weights: Path | None = None  # the backbone's weights file, when the cache was made from one
    overwrite: bool = False
    batch: int = 2  # rows of the tracing / self-check batch

    def __post_init__(self):
        object.__setattr__(self, "target", Path(self.target))
        object.__setattr__(self, "out", Path(self.out))
        if self.out.suffix.lower() not in SUFFIXES and self.out.is_dir():  # not "unknown model format '(no suffix)'"
            raise FieldError(f"`out` {self.out}: is a directory; give a file path ending .pt2 (torch.export), .pt "
                             f"(TorchScript) or .onnx (ONNX), e.g. {self.out / 'model.pt2'}")
        format_of(self.out)
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    @property
    def format(self) -> ExportFormat:
        return format_of(self.out)
