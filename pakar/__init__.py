"""pakar: a Qwen3-MoE-compatible Mixture-of-Experts language model trained from your own text."""

__version__ = "0.1.0"


class PakarError(Exception):
    """A user mistake or bad input: the CLI prints its message on one line and exits with status 2
    (never a traceback). Raise it with a message that names the flag, file or field at fault."""
