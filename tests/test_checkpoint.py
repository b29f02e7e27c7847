"""Checkpoint safety: atomic writes survive a crash mid-save, and nothing loads that could run code."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import atomic_save, model_checkpoint, safe_load
from pakar.config import get_config
from pakar.model import Transformer


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    from pakar.tokenizer import train_tokenizer

    return train_tokenizer(["Indonesia adalah negara kepulauan terbesar di dunia."] * 4, 300).to_json()


def tiny_checkpoint(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = get_config("tiny", vocab_size=300)
    return model_checkpoint(Transformer(cfg).state_dict(), cfg, tiny_tokenizer_json(), epoch=1)


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


# --- a damaged checkpoint is one line naming the file and the problem, never a traceback ---------------

def _damaged(change) -> dict:
    ckpt = tiny_checkpoint()
    change(ckpt)
    return ckpt


def _nan_at(key: str):
    def change(ckpt):
        t = ckpt["model"][key].clone()
        t.view(-1)[0] = float("nan")
        ckpt["model"][key] = t
    return change


DAMAGE = [
    ("bad tokenizer field", lambda c: c.__setitem__("tokenizer", "{ not json"), "tokenizer"),
    ("tokenizer not text", lambda c: c.__setitem__("tokenizer", 7), "'tokenizer' entry is a int"),
    ("missing config", lambda c: c.pop("config"), "'config' entry is missing"),
    ("missing model", lambda c: c.pop("model"), "'model' entry is missing"),
    ("missing meta", lambda c: c.pop("meta"), "'meta' entry is missing"),
    ("config without a shape field", lambda c: c["config"].pop("num_experts"), "lacks num_experts"),
    ("config field of the wrong type", lambda c: c["config"].__setitem__("num_hidden_layers", "2"),
     "num_hidden_layers must be a positive integer"),
    ("non-finite config number", lambda c: c["config"].__setitem__("rope_theta", float("inf")), "rope_theta"),
    ("35 TB config", lambda c: c["config"].update(hidden_size=65536, num_hidden_layers=96, num_experts=2048,
                                                  moe_intermediate_size=16384), "GiB of memory"),
    ("wrong shape", lambda c: c["model"].__setitem__("embed_tokens.weight", torch.zeros(301, 64)),
     r"embed_tokens.weight has shape \(301, 64\), its config implies \(300, 64\)"),
    ("missing weight", lambda c: c["model"].pop("norm.weight"), r"missing \['norm.weight'\]"),
    ("unexpected weight", lambda c: c["model"].__setitem__("extra", torch.zeros(1)), r"unexpected \['extra'\]"),
    ("weight not a tensor", lambda c: c["model"].__setitem__("norm.weight", [1.0]), "not a tensor"),
    ("NaN weight", _nan_at("layers.0.self_attn.q_proj.weight"), "q_proj.weight has 1 non-finite"),
    ("infinite expert weight", lambda c: c["model"]["layers.1.mlp.experts.down_proj"].view(-1).__setitem__(
        0, float("inf")), "down_proj has 1 non-finite"),
]


@pytest.mark.parametrize("what, change, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_refused_on_load(tmp_path, what, change, message):
    from pakar.checkpoint import load_model

    path = tmp_path / "model_epoch1.pt"
    torch.save(_damaged(change), path)
    with pytest.raises(PakarError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_size_cap_is_checked_before_anything_is_allocated(tmp_path):
    """A config asking for 35 TB is refused from the config alone: the check runs before the meta build,
    and check_fits uses pakar.info's parameter count (independent of any built model)."""
    from pakar.checkpoint import check_fits, memory_bytes, model_bytes
    from pakar.info import param_counts

    cfg = get_config("tiny", vocab_size=300)
    assert model_bytes(cfg) == 4 * param_counts(cfg)["total_params"] + 2 * 512 * 16 * 4
    assert memory_bytes("cpu") > 2**27  # this machine has some RAM and we can read it
    huge = cfg.replace(hidden_size=65536, num_hidden_layers=96, num_experts=2048, moe_intermediate_size=16384)
    assert model_bytes(huge) > 30e12
    with pytest.raises(PakarError, match="parameters"):
        check_fits(huge, "cpu")
    check_fits(cfg, "cpu")


def test_a_state_file_works_where_a_model_is_expected(tmp_path):
    from pakar.checkpoint import load_model

    state = tiny_checkpoint()
    state.update(optimizer={"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"params": [0]}]},
                 rng={"torch": torch.get_rng_state()}, loop={}, train_args={}, world_size=1)
    torch.save(state, tmp_path / "state.pt")
    model, _, _ = load_model(tmp_path / "state.pt")
    assert torch.equal(model.embed_tokens.weight, state["model"]["embed_tokens.weight"])


def _state(**changes) -> dict:
    state = tiny_checkpoint()
    state.update(optimizer={"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                            "param_groups": [{"params": [0], "lr": 1e-3}]},
                 rng={"torch": torch.get_rng_state()}, train_args={"seed": 1}, world_size=1,
                 loop={"epoch": 0, "step_in_epoch": 3, "step": 3, "tokens_seen": 10, "elapsed": 1.0})
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": None, "rng": None, "loop": None, "train_args": None, "world_size": None}, "is a model checkpoint"),
    ({"optimizer": None}, "optimizer missing"),
    ({"rng": None}, "rng missing"),
    ({"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}}, "optimizer state is empty"),
    ({"optimizer": {"state": {0: {"exp_avg": torch.full((2,), float("nan"))}}, "param_groups": [{"params": [0]}]}},
     "non-finite"),
    ({"loop": {"epoch": 0}}, "loop counters lack"),
    ({"rng": {}}, "RNG state"),
], ids=["model as state", "no optimizer", "no rng", "empty optimizer", "nan moments", "loop", "empty rng"])
def test_check_resume_state_refuses_incomplete_states(changes, message):
    from pakar.checkpoint import check_resume_state

    check_resume_state(_state(), "state.pt")  # the complete state passes
    # and so does a state saved before the first step (Ctrl-C at once), when AdamW has no moments yet
    check_resume_state(_state(optimizer={"state": {}, "param_groups": [{"params": [0]}]},
                              loop={"epoch": 0, "step_in_epoch": 0, "step": 0, "tokens_seen": 0, "elapsed": 0.1}),
                       "state.pt")
    with pytest.raises(PakarError, match=message):
        check_resume_state(_state(**changes), "state.pt")
