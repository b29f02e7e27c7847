"""The first hour of a new user, on Windows as on Linux (issue 18): what the README's first screen says
runs as written; every command's help and model output survive a cp1252 console; export/serve/chat-batch
default to the newest checkpoint; "not found" errors list what is there; the Windows-only failure
modes (no NCCL, no C++ compiler, a mapped safetensors file, a folder named `pakar` shadowing the
package) give one clear line. What only Windows can show is simulated (a PermissionError from
os.replace, an absent NCCL) and the code path that handles it is what is checked.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import save_model
from pakar.cli import COMMANDS
from pakar.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(tokenizer, seed: int):
    from pakar.config import get_config
    from pakar.model import Transformer

    torch.manual_seed(seed)
    return Transformer(get_config("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_tokenizer):
    """A run folder as `python train.py --epochs 2` leaves it: model_epoch1.pt, model_epoch2.pt (different
    weights), state.pt."""
    d = tmp_path_factory.mktemp("run")
    for epoch in (1, 2):
        model = tiny_model(sample_tokenizer, seed=epoch)
        save_model(d / "checkpoints" / f"model_epoch{epoch}.pt", model.state_dict(), model.config,
                   sample_tokenizer.to_json(), epoch=epoch)
    (d / "checkpoints" / "state.pt").write_bytes(b"not read here")
    return d


def env_without_pythonpath_clash(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONUTF8", None)  # UTF-8 mode would hide the console encoding under test
    return env


# --- console encoding -----------------------------------------------------------------------------

def test_every_help_and_a_non_ascii_chat_batch_under_a_cp1252_console(run_dir, tmp_path):
    """A redirected Windows console (cp1252): help texts and model output never raise UnicodeEncodeError."""
    env = env_without_pythonpath_clash(PYTHONIOENCODING="cp1252")
    # every command's --help in one process (each command's module imported once, as `pakar X --help` does)
    driver = ("import sys\nfrom pakar.cli import main\n"
              "for args in [['--help']] + [[name, '--help'] for name in sys.argv[1:]]:\n"
              "    try:\n        code = main(args)\n    except SystemExit as e:\n        code = e.code\n"
              "    assert code == 0, args\n    print('==done', args[0], flush=True)\n")
    res = subprocess.run([sys.executable, "-c", driver, *COMMANDS], env=env, capture_output=True, timeout=300)
    out = res.stdout.decode("cp1252")
    assert res.returncode == 0, res.stderr.decode("cp1252", "replace")[-2000:]
    assert out.count("==done") == len(COMMANDS) + 1 and out.count("usage:") == len(COMMANDS) + 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Halo \u2713 apa kabar \u65e5\u672c \u2192 \ufffd?\n", encoding="utf-8")
    # no --checkpoint: the newest in the run folder, as chat and eval do
    res = subprocess.run([sys.executable, str(ROOT / "test_chat_batch.py"), "--prompts", str(prompts),
                          "--max-new-tokens", "4", "--out", str(tmp_path / "reports")],
                         cwd=run_dir, env=env, capture_output=True, timeout=300)
    out = res.stdout.decode("cp1252")
    assert res.returncode == 0, res.stderr.decode("cp1252", "replace")[-2000:]
    assert "model_epoch2.pt" in out and "Halo ? apa kabar ?? ? ??" in out  # unencodable characters replaced
    assert (tmp_path / "reports" / "chat_batch_model_epoch2.md").read_text(encoding="utf-8").count("\u2713") == 1


# --- defaults: the newest checkpoint, export/<name> ----------------------------------------------------

def test_export_and_serve_default_to_the_newest_checkpoint(run_dir, monkeypatch, capsys):
    from safetensors.torch import load_file

    from pakar.checkpoint import safe_load
    from pakar.chat import default_model_name, load_generator

    monkeypatch.chdir(run_dir)
    assert cli(["export"]) == 0
    out = run_dir / "export" / "model_epoch2"
    tensors = load_file(out / "model.safetensors")
    newest = safe_load(run_dir / "checkpoints" / "model_epoch2.pt")["model"]
    assert torch.equal(tensors["model.embed_tokens.weight"], newest["embed_tokens.weight"])
    if os.name == "posix":  # every file of the folder has the mode a plain open() gives (0644 under umask 022)
        mask = os.umask(0)
        os.umask(mask)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert modes["model.safetensors"] == 0o666 & ~mask, modes
        assert len(set(modes.values())) == 1, modes
    gen, path = load_generator(device="cpu")
    assert default_model_name(path) == "model_epoch2"
    assert torch.equal(gen.engine.model.embed_tokens.weight, newest["embed_tokens.weight"])
    capsys.readouterr()


def test_missing_files_errors_list_what_is_there(run_dir, tmp_path, monkeypatch, capsys):
    from pakar.checkpoint import latest_epoch_checkpoint

    monkeypatch.chdir(run_dir)
    assert cli(["export", "--checkpoint", "checkpoints/model_epoch5.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_epoch5.pt" in err
    assert "holds: model_epoch1.pt, model_epoch2.pt, state.pt" in err
    assert cli(["serve", "--model", "export/nothing-here"]) == 2
    assert "holds:" in capsys.readouterr().err
    assert cli(["prepare", "--data", "corpus/", "--out", str(tmp_path)]) == 2
    assert "the current folder holds: checkpoints/" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.pt").write_bytes(b"")
    with pytest.raises(PakarError, match=r"checkpoints holds: state.pt"):
        latest_epoch_checkpoint(tmp_path)
    with pytest.raises(PakarError, match=r"there is no folder"):
        latest_epoch_checkpoint(tmp_path / "empty")


# --- safetensors while another process has the old file mapped -------------------------------------

def test_export_over_a_mapped_export(run_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from pakar.checkpoint import safe_load
    from pakar.hf import export_checkpoint

    first, second = (safe_load(run_dir / "checkpoints" / f"model_epoch{e}.pt") for e in (1, 2))
    out = tmp_path / "hf"
    export_checkpoint(first, out, log=lambda *a: None)
    with safe_open(str(out / "model.safetensors"), "pt") as reader:  # holds the file memory-mapped
        before = reader.get_tensor("model.embed_tokens.weight").clone()
        export_checkpoint(second, out, log=lambda *a: None)  # Linux/macOS: the reader keeps the old bytes
        assert torch.equal(reader.get_tensor("model.embed_tokens.weight"), before)
    with safe_open(str(out / "model.safetensors"), "pt") as reader:
        assert torch.equal(reader.get_tensor("model.embed_tokens.weight"), second["model"]["embed_tokens.weight"])

    # Windows refuses to replace a mapped file (PermissionError): one line, old file intact, no temp file left
    def refuse(src, dst):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    old_bytes = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PakarError, match=r"cannot replace .*model.safetensors.*another program may have it open"):
        export_checkpoint(first, out, log=lambda *a: None)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == old_bytes
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# --- distributed backend, --compile --------------------------------------------------------------------

def test_gloo_where_nccl_is_absent(monkeypatch):
    import torch.distributed as dist

    from pakar.distributed import pick_backend

    assert pick_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # Windows' and macOS' PyTorch builds
    assert pick_backend(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert pick_backend(torch.device("cuda", 0)) == "nccl"


def test_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch, capsys):
    from pakar.train import cxx_compiler

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cxx_compiler()[1] is None
    code = cli(["train", "--compile", "--config", "tiny", "--max-steps", "1", "--device", "cpu",
                "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --compile needs a C++ compiler") and err.count("\n") == 1
    assert not (tmp_path / "run" / "data").exists()  # refused before any data work
    fake = tmp_path / "bin" / ("cl.exe" if os.name == "nt" else "g++")
    fake.parent.mkdir()
    fake.write_text("")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert cxx_compiler()[1] is not None  # found as inductor would find it


# --- the chat REPL's /system in text mode ----------------------------------------------------------

def test_system_command_in_text_mode_is_one_consistent_line(sample_tokenizer):
    from pakar.chat import ChatSession
    from pakar.engine import SamplingParams
    from pakar.generate import TextGenerator

    out = io.StringIO()
    session = ChatSession(TextGenerator(tiny_model(sample_tokenizer, 0), sample_tokenizer, chat=False),
                          SamplingParams(max_new_tokens=2), out=out)
    assert session.command("/system Jawab singkat.") is True
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "text mode has no system prompt" in lines[0] and "pakar finetune" in lines[0]
    assert session.system is None


# --- a folder named `pakar` shadowing the package ---------------------------------------------------

@pytest.mark.parametrize("script", ["train.py", "chat_interactive.py", "test_chat_batch.py"])
def test_entry_points_explain_a_shadowing_pakar_folder(tmp_path, script):
    """The repository cloned as `pakar`, seen from its parent folder, is a namespace package without
    pakar.cli: the seed's entry points say what happened and what to do instead of an ImportError."""
    (tmp_path / "pakar").mkdir()
    code = f"import runpy, sys; sys.argv = ['x', '--help']; runpy.run_path({str(ROOT / script)!r}, run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so no installed pakar can win over the folder (what an editable install's
    # finder, consulted after the folder, does too)
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "cannot import pakar.cli" in res.stderr and "Change into the repository folder" in res.stderr


# --- the README's first screen, from a clean clone in a fresh virtual environment ---------------------

def readme_blocks() -> list[str]:
    """The fenced ```bash code blocks of README.md, in order."""
    return re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)


def commands(block: str) -> list[str]:
    """The command lines of a block: comments and blank lines dropped, trailing comments cut."""
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def first_screen() -> tuple[list[str], list[str], list[str]]:
    """(torch choice lines, set-up lines: step 1 then step 2, next-step lines), parsed from the README."""
    blocks = readme_blocks()
    torch_block = next(b for b in blocks if "--index-url" in b)
    setup = next(b for b in blocks if "python train.py" in b and "pytest" in b)
    after = next(b for b in blocks if "python chat_interactive.py" in b and "pakar serve" in b)
    return commands(torch_block), commands(setup), commands(after)


def test_readme_first_screen_is_portable():
    """What the first screen says is runnable in bash and in Windows PowerShell 5.1 as written (no `&&`,
    no line continuations), names a CPU and a CUDA PyTorch line, and keeps DeepSpeed out of the default."""
    torch_lines, setup, after = first_screen()
    assert len(torch_lines) == 2 and any("/whl/cpu" in c for c in torch_lines) and any("/whl/cu" in c for c in torch_lines)
    assert setup[0] == "pip install -e ." and any(c.startswith("python train.py") for c in setup)
    assert setup[-1] == "python -m pytest -q"
    for line in torch_lines + setup + after:
        assert "&&" not in line and "||" not in line and not line.endswith(("\\", "`")), line
    assert not any("deepspeed" in c for c in setup)
    # the checkpoint step 1 writes is the one the examples name
    epochs = int(re.search(r"--epochs (\d+)", next(c for c in setup if c.startswith("python train.py")))[1])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"model_epoch{epochs}" in " ".join(after)
    assert f'model="model_epoch{epochs}"' in readme  # the OpenAI example's model, as `pakar serve` names it


@pytest.mark.slow
@pytest.mark.timeout(5400)  # installs, step 1, the whole default suite (step 2), then the next steps
def test_readme_first_screen_runs_from_a_clean_clone(tmp_path):
    """git clone, a fresh venv (no system site-packages; pip's cache and this machine's wheel folders keep
    it bounded), PyTorch installed as .ci/run does (`pip install torch==2.13.0`), then every set-up line
    of the README as written, then every next-step line (the REPL fed /quit, the server polled)."""
    import httpx

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of pakar")
    _, setup, after = first_screen()
    clone, venv = tmp_path / "pakar-clone", tmp_path / "venv"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head.stdout.strip()], check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUTF8")}
    env |= {"PATH": str(bindir) + os.pathsep + env.get("PATH", ""), "VIRTUAL_ENV": str(venv), "OMP_NUM_THREADS": "1"}

    def run(line: str, **kw) -> subprocess.CompletedProcess:
        print(f"$ {line}", flush=True)  # progress, with -s
        res = subprocess.run(line, shell=True, cwd=clone, env=env, capture_output=True, text=True, **kw)
        assert res.returncode == 0, f"{line}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res

    run("python -m pip install -q torch==2.13.0", timeout=1800)  # as .ci/run does (a CPU build here)
    for line in setup:
        res = run(line, timeout=3600)
    assert re.search(r"\d+ passed", res.stdout) and " failed" not in res.stdout
    assert (clone / "checkpoints" / "model_epoch2.pt").is_file()

    for line in after:
        if line.startswith("pakar serve"):
            server = subprocess.Popen(line + " --port 8765", shell=True, cwd=clone, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
            try:
                for _ in range(240):
                    try:
                        models = httpx.get("http://127.0.0.1:8765/v1/models", timeout=2).json()
                        break
                    except httpx.HTTPError:
                        assert server.poll() is None, server.stdout.read()
                        import time

                        time.sleep(0.5)
                else:
                    raise AssertionError("pakar serve did not answer within 2 minutes")
                assert models["data"][0]["id"] == "model_epoch2" and models["data"][0]["chat"] is False
                r = httpx.post("http://127.0.0.1:8765/v1/chat/completions", timeout=120, json={
                    "model": "model_epoch2", "max_tokens": 8, "messages": [{"role": "user", "content": "Halo!"}]})
                assert r.status_code == 200, r.text
            finally:
                os.killpg(server.pid, 15) if os.name == "posix" else server.terminate()
                server.wait(timeout=60)
        else:
            run(line, input="/quit\n", timeout=1800)
    assert (clone / "reports" / "chat_batch_model_epoch2.md").is_file()
    assert (clone / "export" / "model_epoch2" / "model.safetensors").is_file()
    assert (clone / "ft_chat" / "checkpoints" / "model_epoch3.pt").is_file()
