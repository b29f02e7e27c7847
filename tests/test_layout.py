"""The layout's promises (issue 16): imports run one way and every module stands alone; the command layer
answers `--help` without torch (issue 18's start-up promise, as behaviour; benchmarks/bench_startup.py
times it).

- Each module of pakar/ imports in a fresh interpreter with no other pakar module loaded before it (a
  module that only worked because another had been imported first fails here).
- The import graph of pakar/, read with `ast` from every import statement (those inside functions too),
  has no cycle.
- `pakar --help`, every `pakar <command> --help` and a usage error leave torch (and numpy, tokenizers,
  fastapi) unimported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAKAR = REPO / "pakar"
HEAVY = ("torch", "numpy", "tokenizers", "fastapi", "transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PAKAR.rglob("*.py"))}


def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def import_graph() -> dict[str, set[str]]:
    """module -> the pakar modules it imports anywhere in its file (top level or inside functions)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pakar import x`
            else:
                continue
            deps |= {t for t in targets if t in MODULES and t not in (name, "pakar")}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    """The checker itself: a planted circle is found and printed in order."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_alone():
    names = sorted(set(MODULES) - {"pakar.__main__"})  # __main__ runs the command line when imported
    code = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "pakar" or m.startswith("pakar.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps(failed))
"""
    failed = json.loads(run_python(code))
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_help_and_usage_errors_do_not_import_torch():
    from pakar.cli import COMMANDS

    calls = [["--help"]] + [[name, "--help"] for name in COMMANDS] + [["export", "--bogus"], ["train", "--epochs", "x"]]
    code = f"""
import contextlib, io, json, sys
from pakar.cli import main
codes = []
for argv in {calls!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
    codes[-1] = [argv, codes[-1], len(out.getvalue()), err.getvalue()[-200:]]
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "codes": codes}}))
"""
    res = json.loads(run_python(code))
    assert res["heavy"] == [], f"imported before any work: {res['heavy']}"
    for argv, code_, printed, err in res["codes"]:
        if argv[-1] == "--help":
            assert code_ == 0 and printed > 200, (argv, code_, err)  # the full help went to stdout
        else:
            assert code_ == 2 and "error:" in err, (argv, code_, err)  # argparse's usage error
