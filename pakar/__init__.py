"""pakar: a Qwen3-MoE-compatible Mixture-of-Experts language model trained from your own text."""

from pathlib import Path

__version__ = "0.1.0"


class PakarError(Exception):
    """A user mistake or bad input: the CLI prints its message on one line and exits with status 2
    (never a traceback). Raise it with a message that names the flag, file or field at fault."""


def what_is_there(path, limit: int = 12) -> str:
    """For "not found" errors: what the folder that should hold `path` does hold, e.g.
    "(checkpoints holds: model_epoch1.pt, model_epoch2.pt, state.pt)", so the fix is in the message."""
    folder = Path(path).parent
    where = "the current folder" if folder == Path(".") else str(folder)
    if not folder.is_dir():
        return f"(there is no folder {where})"
    names = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return f"({where} is empty)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"({where} holds: {', '.join(names[:limit])}{more})"
