"""Bad-input fault matrix: malformed checkpoints, states, corpora and flags through the real CLI.

Every case runs `python -m pakar ...` as a subprocess (what a user types) and is classified by its exit:
  refused     exit 2 with a one-line "error: ..." and no traceback (the wanted answer to bad input)
  ok          exit 0 (the wanted answer for the control cases and for input pakar accepts by design,
              e.g. a state.pt where a model checkpoint is expected)
  traceback   "Traceback (most recent call last)" in the output: the defect this script counts
  accepted    exit 0 on input that should have been refused (e.g. a negative --weight-decay)
  other       any other exit status, or a refusal on a control case
  timeout     ran past its time limit (e.g. quadratic tokenizer training on a line without spaces)

Matrices:
  checkpoints x {chat-batch, eval, export, train --init-from, serve startup}: bad tokenizer field, wrong
      shapes, a config asking for ~35 TB, missing entries and fields, truncated / empty / random files,
      NaN and infinite weights, tensors that are not tensors, a LoRA adapter, a pickle that runs code
  states x {train --resume}: a model checkpoint as state.pt, no optimizer, an empty optimizer, no RNG,
      non-finite weights, truncated
  corpora x {prepare, tokenizer}: empty file, binary, invalid UTF-8, UTF-16, NULs, a 1 MB line without
      spaces, a broken .gz, malformed JSONL, an empty folder, a missing path, a symlink loop
  flags x {train, eval, chat-batch, chat, export, prepare, tokenizer, finetune, lora-merge, serve}

Usage: python benchmarks/fault_inputs.py [--jobs 2] [--only checkpoint,state,corpus,flag] [--timeout 120]
       [--spawn]   (default: each case is a process forked from one that imported pakar once; --spawn
                    starts `python -m pakar` afresh per case, as on Windows)
Prints one line per case, counts, and one JSON object on the last line. main() returns that dict
(benchmarks/fault_matrix.py calls it).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Case:
    group: str  # checkpoint | state | corpus | flag
    name: str
    argv: list[str]  # arguments after `python -m pakar`
    expect: str = "refused"  # refused | ok | any (either is fine, a traceback is not)
    timeout: float = 120.0
    stdin: str = ""


@dataclass
class Result:
    case: Case
    outcome: str
    rc: int | None
    seconds: float
    line: str  # the error line, or the last line of output


def classify(case: Case, rc: int | None, stdout: str, stderr: str, seconds: float) -> Result:
    if rc is None:
        return Result(case, "timeout", None, seconds, f"no answer in {case.timeout:g} s")
    out = stdout + stderr
    errors = [ln for ln in stderr.splitlines() if "error: " in ln]  # pakar's "error: ..." or argparse's
    last = errors[-1] if errors else (out.strip().splitlines() or [""])[-1]
    if TRACEBACK in out:
        return Result(case, "traceback", rc, seconds, [ln for ln in out.splitlines() if ln.strip()][-1])
    if rc == 0:
        outcome = "accepted" if case.expect == "refused" else "ok"
    elif rc == 2 and errors and case.expect != "ok":
        outcome = "refused"
    else:
        outcome = "other"
    return Result(case, outcome, rc, seconds, last)


def run_case(case: Case, env: dict, cwd: Path) -> Result:
    """One case as `python -m pakar ...` (portable; pays the interpreter and torch start per case)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pakar", *case.argv], cwd=cwd, env=env, input=case.stdin,
                              capture_output=True, text=True, timeout=case.timeout, errors="replace")
    except subprocess.TimeoutExpired:
        return classify(case, None, "", "", time.perf_counter() - t0)
    return classify(case, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def fork_server(cases_path: Path, results_path: Path, jobs: int) -> None:
    """Runs every case in a forked child of one process that has imported torch and every pakar command
    once: each case is still its own process running pakar's CLI entry point (`python -m pakar`'s
    main), with its own stdin/stdout/stderr files, exit status and, for an uncaught exception, the
    interpreter's traceback; only the start-up is shared. POSIX only (fork); nothing is computed
    before forking, so no thread pool exists yet."""
    import importlib
    import signal
    import traceback

    from pakar.cli import COMMANDS, main as cli_main

    for module, _, _ in COMMANDS.values():
        importlib.import_module(module)
    cases = json.loads(cases_path.read_text(encoding="utf-8"))
    work = results_path.parent / "io"
    work.mkdir(exist_ok=True)
    results: list[dict | None] = [None] * len(cases)
    queue, running = list(range(len(cases))), {}
    while queue or running:
        while queue and len(running) < jobs:
            i = queue.pop(0)
            (work / f"{i}.in").write_text(cases[i]["stdin"], encoding="utf-8")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: become `python -m pakar ARGV` with redirected streams
                code = 1
                try:
                    for fd, name, mode in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                           (2, "err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                        os.dup2(os.open(work / f"{i}.{name}", mode, 0o644), fd)
                    os.chdir(cases[i]["cwd"])
                    sys.argv = ["pakar", *cases[i]["argv"]]
                    code = cli_main(cases[i]["argv"])
                except SystemExit as e:  # argparse exits 2 on a malformed flag
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # what the interpreter prints for an uncaught exception
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(int(code or 0))
            running[pid] = (i, time.perf_counter())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (i, t0) in list(running.items()):
                if time.perf_counter() - t0 > cases[i]["timeout"]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    results[i] = {"rc": None, "seconds": time.perf_counter() - t0, "stdout": "", "stderr": ""}
                    del running[pid]
            time.sleep(0.02)
            continue
        i, t0 = running.pop(pid)
        read = lambda name: (work / f"{i}.{name}").read_text(encoding="utf-8", errors="replace")  # noqa: E731
        results[i] = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
                      "stdout": read("out")[-20000:], "stderr": read("err")[-20000:]}
    results_path.write_text(json.dumps(results), encoding="utf-8")


def run_all(cases: list[Case], env: dict, cwd: Path, jobs: int, spawn: bool) -> list[Result]:
    if spawn or not hasattr(os, "fork"):
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda c: run_case(c, env, cwd), cases))
    cases_path, results_path = cwd / "cases.json", cwd / "results.json"
    cases_path.write_text(json.dumps([{"argv": c.argv, "stdin": c.stdin, "timeout": c.timeout, "cwd": str(cwd)}
                                      for c in cases]), encoding="utf-8")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fork-server", str(cases_path),
                    str(results_path), "--jobs", str(jobs)], env=env, cwd=cwd, check=True)
    raw = json.loads(results_path.read_text(encoding="utf-8"))
    return [classify(c, r["rc"], r["stdout"], r["stderr"], r["seconds"]) for c, r in zip(cases, raw)]


# --- fixtures -----------------------------------------------------------------------------------------

def make_fixtures(root: Path) -> dict:
    """A tiny model checkpoint, a LoRA adapter, a resumable state and a small corpus, built in-process."""
    sys.path.insert(0, str(REPO))
    import torch

    from pakar.checkpoint import model_checkpoint
    from pakar.config import get_config
    from pakar.corpus import embedded_sample_path
    from pakar.model import Transformer
    from pakar.tokenizer import train_tokenizer

    text = embedded_sample_path().read_text(encoding="utf-8").splitlines()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(text[:200]) + "\n", encoding="utf-8")
    tok = train_tokenizer(text, 512)
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    good = model_checkpoint(model.state_dict(), cfg, tok.to_json(), epoch=1, step=1, config_name="tiny",
                            seq_len=32)
    prompts = root / "prompts.txt"
    prompts.write_text("Indonesia adalah\nApa itu komputer?\n", encoding="utf-8")
    return {"good": good, "corpus": corpus, "prompts": prompts}


def save(obj, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


def checkpoint_variants(good: dict) -> dict[str, object]:
    """name -> a checkpoint dict (or raw bytes) that must be refused with one line."""
    import torch

    def edit(fn):
        c = copy.deepcopy(good)
        fn(c)
        return c

    def set_weight(key, value):
        return lambda c: c["model"].__setitem__(key, value)

    cfg = good["config"]
    V, D = good["model"]["embed_tokens.weight"].shape
    huge = {**cfg, "hidden_size": 65536, "num_hidden_layers": 96, "num_experts": 2048, "moe_intermediate_size": 16384}
    nan_w = good["model"]["layers.0.self_attn.q_proj.weight"].clone()
    nan_w[0, 0] = float("nan")
    inf_w = good["model"]["layers.1.mlp.experts.down_proj"].clone()
    inf_w[0, 0, 0] = float("inf")
    raw = {}
    buf = __import__("io").BytesIO()
    torch.save(good, buf)
    blob = buf.getvalue()
    raw["truncated"] = blob[: len(blob) // 2]
    raw["empty_file"] = b""
    raw["random_bytes"] = os.urandom(4096)
    return {
        "tokenizer_not_json": edit(lambda c: c.__setitem__("tokenizer", "{ not json")),
        "tokenizer_wrong_json": edit(lambda c: c.__setitem__("tokenizer", json.dumps({"model": {"type": "BPE"}}))),
        "tokenizer_not_str": edit(lambda c: c.__setitem__("tokenizer", 12345)),
        "tokenizer_too_big": edit(lambda c: c["config"].__setitem__("vocab_size", 300)) if V > 300 else None,
        "embed_wrong_shape": edit(set_weight("embed_tokens.weight", torch.zeros(V + 7, D))),
        "expert_wrong_shape": edit(set_weight("layers.0.mlp.experts.gate_proj",
                                              torch.zeros(3, 64, D))),
        "config_35tb": edit(lambda c: c.__setitem__("config", huge)),
        "config_hidden_mismatch": edit(lambda c: c["config"].__setitem__("hidden_size", D * 2)),
        "config_string_field": edit(lambda c: c["config"].__setitem__("num_hidden_layers", "2")),
        "config_negative_field": edit(lambda c: c["config"].__setitem__("num_experts", -4)),
        "config_nan_rope": edit(lambda c: c["config"].__setitem__("rope_theta", float("nan"))),
        "config_missing_field": edit(lambda c: c["config"].pop("num_experts")),
        "config_not_dict": edit(lambda c: c.__setitem__("config", [1, 2])),
        "no_config": edit(lambda c: c.pop("config")),
        "no_model": edit(lambda c: c.pop("model")),
        "no_tokenizer": edit(lambda c: c.pop("tokenizer")),
        "no_meta": edit(lambda c: c.pop("meta")),
        "missing_weight": edit(lambda c: c["model"].pop("norm.weight")),
        "extra_weight": edit(set_weight("layers.9.extra", torch.zeros(2))),
        "weight_not_tensor": edit(set_weight("norm.weight", [1.0, 2.0])),
        "nan_weight": edit(set_weight("layers.0.self_attn.q_proj.weight", nan_w)),
        "inf_weight": edit(set_weight("layers.1.mlp.experts.down_proj", inf_w)),
        "not_a_dict": [1, 2, 3],
        "wrong_format": edit(lambda c: c.__setitem__("format", "something-else")),
        "lora_adapter": {"format": "pakar-lora-v1", "adapters": {}, "lora": {}},
        **{k: v for k, v in raw.items()},
    }


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def state_variants(state: dict, good: dict) -> dict[str, object]:
    def edit(fn):
        c = copy.deepcopy(state)
        fn(c)
        return c

    nan_state = edit(lambda c: c["model"]["norm.weight"].fill_(float("nan")))
    return {
        "model_checkpoint_as_state": copy.deepcopy(good),
        "no_optimizer": edit(lambda c: c.pop("optimizer")),
        "empty_optimizer": edit(lambda c: c.__setitem__("optimizer", {"state": {}, "param_groups": []})),
        "empty_optimizer_moments": edit(lambda c: c["optimizer"].__setitem__("state", {})),
        "no_rng": edit(lambda c: c.pop("rng")),
        "no_loop": edit(lambda c: c.pop("loop")),
        "loop_missing_counter": edit(lambda c: c["loop"].pop("step")),
        "no_train_args": edit(lambda c: c.pop("train_args")),
        "nan_weights": nan_state,
        "bad_tokenizer": edit(lambda c: c.__setitem__("tokenizer", "nope")),
    }


def build_cases(root: Path, fx: dict, groups: set[str], timeout: float) -> list[Case]:
    import shutil

    import torch

    cases: list[Case] = []
    corpus, prompts = str(fx["corpus"]), str(fx["prompts"])
    train_small = ["--config", "tiny", "--batch", "2", "--seq-len", "16", "--max-steps", "1", "--epochs", "1",
                   "--device", "cpu", "--vocab-size", "300"]

    def per_checkpoint(name: str, path: Path, expect: str = "refused") -> None:
        out = root / "out" / name
        cases.extend([
            Case("checkpoint", f"{name} | chat-batch", ["chat-batch", "--checkpoint", str(path), "--prompts", prompts,
                                                       "--max-new-tokens", "2", "--out", str(out / "reports"),
                                                       "--device", "cpu"], expect, timeout),
            Case("checkpoint", f"{name} | eval", ["eval", "--checkpoint", str(path), "--data", corpus,
                                                 "--max-tokens", "64", "--seq-len", "16", "--device", "cpu"],
                 expect, timeout),
            Case("checkpoint", f"{name} | export", ["export", "--checkpoint", str(path), "--out", str(out / "hf")],
                 expect, timeout),
            Case("checkpoint", f"{name} | train --init-from", ["train", "--init-from", str(path), "--data", corpus,
                                                              "--out", str(out / "ft"), *train_small],
                 expect, timeout),
            Case("checkpoint", f"{name} | chat", ["chat", "--checkpoint", str(path), "--device", "cpu",
                                                 "--max-new-tokens", "2"], expect, timeout, stdin="halo\n/quit\n"),
        ])
        if expect != "ok":  # a good checkpoint would start a server that never exits
            cases.append(Case("checkpoint", f"{name} | serve", ["serve", "--checkpoint", str(path), "--port", "18931",
                                                                "--device", "cpu"], expect, timeout))

    if "checkpoint" in groups or "state" in groups:
        ck = root / "ck"
        ck.mkdir()
        save(fx["good"], ck / "good.pt")
    if "checkpoint" in groups:
        per_checkpoint("good_control", ck / "good.pt", "ok")
        for name, obj in checkpoint_variants(fx["good"]).items():
            if obj is None:
                continue
            path = ck / f"{name}.pt"
            path.write_bytes(obj) if isinstance(obj, bytes) else save(obj, path)
            per_checkpoint(name, path)
        with open(ck / "runs_code.pt", "wb") as f:
            pickle.dump(_RunsCode(), f)
        per_checkpoint("pickle_runs_code", ck / "runs_code.pt")
        per_checkpoint("missing_file", ck / "does_not_exist.pt")

    if "state" in groups:
        # a real resumable state from a 2-step run, then damaged copies of it, each in its own run folder
        base = root / "state_run"
        tail = ["--save-every", "1", "--config", "tiny", "--batch", "2", "--seq-len", "16", "--max-steps", "2",
                "--epochs", "1", "--device", "cpu", "--vocab-size", "300"]
        proc = subprocess.run([sys.executable, "-m", "pakar", "train", "--data", corpus, "--out", str(base), *tail],
                              cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
        state_path = base / "checkpoints" / "state.pt"

        def resume(run: Path) -> list[str]:
            return ["train", "--data", corpus, "--out", str(run), *tail, "--resume"]

        if not state_path.is_file():
            print(f"could not make a state to damage:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        else:
            state = torch.load(state_path, weights_only=True)
            cases.append(Case("state", "good_state_control | train --resume", resume(base), "ok", timeout))
            cases.append(Case("state", "good_state_as_model | chat-batch",
                              ["chat-batch", "--checkpoint", str(state_path), "--prompts", prompts,
                               "--max-new-tokens", "2", "--out", str(root / "out" / "state_reports")], "ok", timeout))
            cases.append(Case("state", "good_state_as_model | export",
                              ["export", "--checkpoint", str(state_path), "--out", str(root / "out" / "state_hf")],
                              "ok", timeout))
            variants = state_variants(state, fx["good"])
            blob = state_path.read_bytes()
            variants["truncated"] = blob[: len(blob) // 3]
            for name, obj in variants.items():
                run = root / "states" / name
                shutil.copytree(base, run, ignore=shutil.ignore_patterns("state.pt", "training.log", "metrics.jsonl"))
                target = run / "checkpoints" / "state.pt"
                target.write_bytes(obj) if isinstance(obj, bytes) else save(obj, target)
                cases.append(Case("state", f"{name} | train --resume", resume(run), "refused", timeout))

    if "corpus" in groups:
        cdir = root / "corpora"
        cdir.mkdir()
        files = {
            "empty.txt": b"",
            "blank_lines.txt": b"\n\n  \n\t\n",
            "binary.txt": os.urandom(8192),
            "invalid_utf8.txt": b"baris satu \xff\xfe rusak\nbaris dua \xc3\x28 juga\n" * 50,
            "utf16.txt": "Indonesia adalah negara kepulauan.\n".encode("utf-16") * 50,
            "nul_bytes.txt": b"teks dengan \x00 NUL\n" * 100,
            "no_spaces_1mb.txt": (b"abcdefghij" * 100_000) + b"\n",
            "broken.gz": gzip.compress(os.urandom(3000).hex().encode() + b"\n")[:2000],  # cut mid-stream
            "malformed.jsonl": b'{"text": "ok satu"}\n{not json\n[1, 2]\n{"other": 1}\n',
            "only_bad.jsonl": b"{not json\n",
            "image.png": b"\x89PNG\r\n\x1a\n" + os.urandom(2048),
        }
        for fname, data in files.items():
            (cdir / fname).write_bytes(data)
        (cdir / "empty_dir").mkdir()
        loop = cdir / "loop_dir"
        loop.mkdir()
        (loop / "a.txt").write_text("satu dokumen saja\n", encoding="utf-8")
        try:
            (loop / "self").symlink_to(loop, target_is_directory=True)
        except OSError:
            pass
        specs = {**{f: str(cdir / f) for f in files}, "empty_dir": str(cdir / "empty_dir"),
                 "missing_path": str(cdir / "nope.txt"), "glob_no_match": str(cdir / "*.nothing"),
                 "symlink_loop": str(loop)}
        # accepted with a warning by design (the line is kept, cleaned, counted): exit 0 or a clean refusal
        fine = {"invalid_utf8.txt", "nul_bytes.txt", "malformed.jsonl", "no_spaces_1mb.txt", "symlink_loop"}
        for name, spec in specs.items():
            expect = "any" if name in fine else "refused"
            out = root / "out" / "corpus" / name
            cases.append(Case("corpus", f"{name} | tokenizer", ["tokenizer", "--data", spec, "--vocab-size", "300",
                                                               "--out", str(out)], expect, timeout))
            cases.append(Case("corpus", f"{name} | prepare", ["prepare", "--data", spec, "--vocab-size", "300",
                                                             "--out", str(out)], expect, timeout))

    if "flag" in groups:
        a_file = root / "a_file.txt"
        a_file.write_text("not a folder\n", encoding="utf-8")
        ckpt = root / "ck" / "good.pt"
        if not ckpt.is_file():
            ckpt.parent.mkdir(exist_ok=True)
            save(fx["good"], ckpt)
        train_flags = {
            "--seed -1": ["--seed", "-1"], "--device mps": ["--device", "mps"], "--device gpu7": ["--device", "gpu7"],
            "--out FILE": ["--out", str(a_file)], "--min-lr-ratio -1": ["--min-lr-ratio", "-1"],
            "--min-lr-ratio 2": ["--min-lr-ratio", "2"], "--weight-decay -5": ["--weight-decay", "-5"],
            "--grad-clip nan": ["--grad-clip", "nan"], "--grad-clip -1": ["--grad-clip", "-1"],
            "--warmup -5": ["--warmup", "-5"], "--time-limit nan": ["--time-limit", "nan"],
            "--time-limit -1": ["--time-limit", "-1"], "--lr nan": ["--lr", "nan"], "--lr inf": ["--lr", "inf"],
            "--lr -1": ["--lr", "-1"], "--val-fraction 0": ["--val-fraction", "0"],
            "--val-fraction 1.5": ["--val-fraction", "1.5"], "--val-fraction nan": ["--val-fraction", "nan"],
            "--epochs 0": ["--epochs", "0"], "--batch 0": ["--batch", "0"], "--seq-len 2": ["--seq-len", "2"],
            "--max-steps 0": ["--max-steps", "0"], "--eval-tokens 0": ["--eval-tokens", "0"],
            "--vocab-size 10": ["--vocab-size", "10"], "--grad-accum 0": ["--grad-accum", "0"],
            "--weight-decay inf": ["--weight-decay", "inf"], "--seed 2**70": ["--seed", str(2**70)],
            "--init-from missing": ["--init-from", str(root / "nope.pt")],
            "--deepspeed-config missing": ["--deepspeed", "--deepspeed-config", str(root / "nope.json")],
            "--data missing": ["--data", str(root / "nope.txt")],
        }
        for name, extra in train_flags.items():
            argv = ["train", "--data", corpus, "--out", str(root / "out" / "flags" / name.replace(" ", "_")),
                    *train_small, *extra]
            cases.append(Case("flag", f"train {name}", argv, "refused", timeout))
        chat_batch = ["chat-batch", "--checkpoint", str(ckpt), "--prompts", prompts, "--out",
                      str(root / "out" / "flag_reports"), "--max-new-tokens", "2"]
        for name, extra in {"--temperature nan": ["--temperature", "nan"], "--temperature -1": ["--temperature", "-1"],
                            "--temperature inf": ["--temperature", "inf"], "--top-p 2": ["--top-p", "2"],
                            "--top-p nan": ["--top-p", "nan"], "--top-k -1": ["--top-k", "-1"],
                            "--repetition-penalty inf": ["--repetition-penalty", "inf"],
                            "--repetition-penalty nan": ["--repetition-penalty", "nan"],
                            "--repetition-penalty 0": ["--repetition-penalty", "0"],
                            "--max-new-tokens 0": ["--max-new-tokens", "0"], "--batch-size 0": ["--batch-size", "0"],
                            "--seed -1": ["--seed", "-1"], "--seed 2**70": ["--seed", str(2**70)],
                            "--device mps": ["--device", "mps"], "--prompts missing": ["--prompts", "nope.txt"],
                            "--out FILE": ["--out", str(a_file)]}.items():
            cases.append(Case("flag", f"chat-batch {name}", [*chat_batch, *extra], "refused", timeout))
        for name, extra in {"--temperature nan": ["--temperature", "nan"], "--top-p 0": ["--top-p", "0"],
                            "--max-new-tokens -3": ["--max-new-tokens", "-3"], "--seed -1": ["--seed", "-1"]}.items():
            cases.append(Case("flag", f"chat {name}", ["chat", "--checkpoint", str(ckpt), *extra], "refused",
                              timeout, stdin="halo\n/quit\n"))
        evaluate = ["eval", "--checkpoint", str(ckpt), "--data", corpus]
        for name, extra in {"--seq-len 0": ["--seq-len", "0"], "--seq-len 100000": ["--seq-len", "100000"],
                            "--batch-size 0": ["--batch-size", "0"], "--max-tokens -1": ["--max-tokens", "-1"],
                            "--plot x.txt": ["--plot", "x.txt"], "--device mps": ["--device", "mps"]}.items():
            cases.append(Case("flag", f"eval {name}", [*evaluate, *extra], "refused", timeout))
        export = ["export", "--checkpoint", str(ckpt)]
        for name, extra in {"--max-shard-size 0": ["--max-shard-size", "0", "--out", str(root / "out" / "e1")],
                            "--max-shard-size nanGB": ["--max-shard-size", "nanGB", "--out", str(root / "out" / "e2")],
                            "--max-shard-size -5MB": ["--max-shard-size", "-5MB", "--out", str(root / "out" / "e3")],
                            "--out FILE": ["--out", str(a_file)]}.items():
            cases.append(Case("flag", f"export {name}", [*export, *extra], "refused", timeout))
        for name, extra in {"--val-fraction nan": ["--val-fraction", "nan"], "--val-fraction -1": ["--val-fraction", "-1"],
                            "--vocab-size 5": ["--vocab-size", "5"], "--vocab-size 10**9": ["--vocab-size", "1000000000"],
                            "--out FILE": ["--out", str(a_file)]}.items():
            cases.append(Case("flag", f"prepare {name}", ["prepare", "--data", corpus, *extra], "refused", timeout))
        for name, extra in {"--vocab-size -1": ["--vocab-size", "-1"], "--vocab-size 10**9": ["--vocab-size", "1000000000"],
                            "--out FILE": ["--out", str(a_file)]}.items():
            cases.append(Case("flag", f"tokenizer {name}", ["tokenizer", "--data", corpus, *extra], "refused", timeout))
        finetune = ["finetune", "--checkpoint", str(ckpt), "--data", corpus, "--max-steps", "1", "--batch", "2",
                    "--seq-len", "16", "--device", "cpu"]
        for name, extra in {"--lora-rank -1": ["--lora-rank", "-1"], "--lora-alpha nan": ["--lora-rank", "2", "--lora-alpha", "nan"],
                            "--lora-alpha -1": ["--lora-rank", "2", "--lora-alpha", "-1"],
                            "--lora-targets bogus": ["--lora-rank", "2", "--lora-targets", "bogus"],
                            "--lr nan": ["--lr", "nan"], "--weight-decay -5": ["--weight-decay", "-5"],
                            "--seq-len 100000": ["--seq-len", "100000"], "--config small": ["--config", "small"]}.items():
            out = ["--out", str(root / "out" / "ft_flags" / name.split()[0].strip("-"))]
            cases.append(Case("flag", f"finetune {name}", [*finetune, *out, *extra], "refused", timeout))
        cases.append(Case("flag", "lora-merge model-as-adapter", ["lora-merge", "--adapter", str(ckpt), "--out",
                                                                  str(root / "out" / "m.pt")], "refused", timeout))
        cases.append(Case("flag", "lora-merge missing", ["lora-merge", "--adapter", str(root / "nope.pt"), "--out",
                                                         str(root / "out" / "m.pt")], "refused", timeout))
        for name, extra in {"--port 0": ["--port", "0"], "--port 70000": ["--port", "70000"],
                            "--max-batch 0": ["--max-batch", "0"], "--device mps": ["--device", "mps"]}.items():
            cases.append(Case("flag", f"serve {name}", ["serve", "--checkpoint", str(ckpt), *extra], "refused", timeout))
        cases.append(Case("flag", "import missing folder", ["import", "--from", str(root / "nope"), "--out",
                                                            str(root / "out" / "i.pt")], "refused", timeout))
    return cases


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--only", default="checkpoint,state,corpus,flag", help="comma-separated groups (default all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    p.add_argument("--verbose", action="store_true", help="print every case, not only the failures")
    p.add_argument("--spawn", action="store_true", help="start `python -m pakar` afresh for every case (slower; "
                   "the default forks each case from one process that has imported pakar, where fork exists)")
    p.add_argument("--fork-server", nargs=2, metavar=("CASES", "RESULTS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fork_server:
        fork_server(Path(args.fork_server[0]), Path(args.fork_server[1]), args.jobs)
        return {}
    groups = set(args.only.split(","))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pakar_fault_inputs_") as tmp:
        root = Path(tmp)
        fx = make_fixtures(root)
        cases = build_cases(root, fx, groups, args.timeout)
        print(f"{len(cases)} cases ({', '.join(sorted(groups))}), {args.jobs} at a time", flush=True)
        results = run_all(cases, _env(), root, args.jobs, args.spawn)
    counts: dict[str, int] = {}
    by_group: dict[str, dict[str, int]] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        g = by_group.setdefault(r.case.group, {})
        g[r.outcome] = g.get(r.outcome, 0) + 1
        bad = r.outcome in ("traceback", "accepted", "other", "timeout")
        if bad or args.verbose:
            print(f"{'!!' if bad else 'ok'} {r.outcome:<9} {r.seconds:6.1f}s  [{r.case.group}] {r.case.name}: "
                  f"{r.line[:200]}")
    summary = {"runs": len(results), "tracebacks": counts.get("traceback", 0),
               "refused": counts.get("refused", 0), "ok": counts.get("ok", 0),
               "accepted_bad_input": counts.get("accepted", 0), "other": counts.get("other", 0),
               "timeouts": counts.get("timeout", 0), "by_group": by_group,
               "slowest_s": round(max((r.seconds for r in results), default=0.0), 1),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{summary['runs']} runs: {summary['tracebacks']} tracebacks, {summary['refused']} refused with one line, "
          f"{summary['ok']} ok, {summary['accepted_bad_input']} bad inputs accepted, {summary['other']} other, "
          f"{summary['timeouts']} timeouts ({summary['seconds']} s)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    s = main()
    sys.exit(0 if s.get("tracebacks", 0) == 0 else 1)
