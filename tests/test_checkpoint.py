"""Checkpoint safety: atomic writes survive a crash mid-save, and nothing loads that could run code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import atomic_save, model_checkpoint, safe_load
from pakar.config import get_config
from pakar.model import Transformer


def tiny_checkpoint(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = get_config("tiny", vocab_size=300)
    return model_checkpoint(Transformer(cfg).state_dict(), cfg, '{"not": "used here"}', epoch=1)


def test_interrupted_save_keeps_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    good = tiny_checkpoint(0)
    atomic_save(good, path)

    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):  # write some bytes, then die as a killed process would
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)
        raise OSError("simulated crash during write")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        atomic_save(tiny_checkpoint(1), path)
    monkeypatch.setattr(torch, "save", real_save)

    loaded = safe_load(path)
    for k, v in good["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


class Exploit:
    def __reduce__(self):  # what a malicious checkpoint does: run code on load
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    Exploit.marker = str(marker)
    evil = tiny_checkpoint()
    evil["meta"]["payload"] = Exploit()
    path = tmp_path / "model_epoch1.pt"
    torch.save(evil, path)
    with pytest.raises(PakarError, match="refusing to load"):
        safe_load(path)
    assert not marker.exists()
    # and the plain pickle module would indeed have run it: the test has teeth
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.read_text() == "pwned"


def test_truncated_and_foreign_files_get_one_line_errors(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save(tiny_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(PakarError, match="truncated"):
        safe_load(path)
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(PakarError):
        safe_load(tmp_path / "notes.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(PakarError, match="not a pakar checkpoint"):
        safe_load(tmp_path / "other.pt")
    with pytest.raises(PakarError, match="not found"):
        safe_load(tmp_path / "missing.pt")
