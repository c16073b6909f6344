"""``dvml.devices``: auto = cuda, then mps, then cpu; unavailable devices are one clear error."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dvml import devices
from dvml.cli import app
from dvml.errors import DvmlError


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    assert devices.resolve_device("auto") == torch.device(expected)
    assert devices.autocast_dtype(torch.device(expected)) == (None if expected == "cpu" else torch.float16)
    assert devices.pin_memory(torch.device(expected)) is (expected == "cuda")


def test_explicit_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DvmlError, match="^device mps: Apple-silicon MPS is not available here .available: cpu"):
        devices.resolve_device("mps")
    with pytest.raises(DvmlError, match="^device cuda:1: CUDA is not available"):
        devices.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="^device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        devices.resolve_device("gpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.resolve_device("mps") == torch.device("mps")


def test_extract_cli_reports_a_missing_mps_in_one_line(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    r = CliRunner().invoke(app, ["extract", "folder", "--root", str(tiny_folder), "--out", str(tmp_path / "o.h5"),
                                 "--weights", "none", "--device", "mps", "--workers", "0"])
    assert r.exit_code == 1 and "mps: Apple-silicon MPS is not available" in r.output
    assert "Traceback" not in r.output
