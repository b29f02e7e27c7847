"""A run's curves, TensorBoard events and report card, all from its metrics.jsonl.

    read_metrics(path) -> Records          the run's records, as the last run in the file left them
    draw_curves(records, run_dir)          curves/*.png (pakar.plots)
    write_report(run_dir) -> dict          curves + report.md; what `pakar report RUN_DIR` and the end of a run call
    LiveCurves(run_dir, say)               the training loop's refresh at each evaluation
    tensorboard_writer / to_tensorboard    --tensorboard: the same records as TensorBoard scalars

Choices:
- metrics.jsonl is the one source: the report of a finished run, of a run still going and of one that
  was killed are built the same way, by reading it. The loop writes a "start" record (settings, data,
  plan) when a process starts training, "train", "val", "skip" and "sample" records as it goes, and an
  "end" record (the summary) when it ends; nothing else is needed, no checkpoint, no torch: `pakar
  report` imports only the standard library (and matplotlib for the images).
- The file is appended to across processes: --resume adds a segment, --overwrite starts a new run
  after the old one's records. A start record without "resume" begins a new run (the earlier records
  are another run's and are left out, except the "before fine-tuning" validation that pakar.finetune
  writes just before the loop starts); a resumed start at step S drops the records after S that the
  killed process wrote (resume replays those steps, and the replay's records are the run's).
- A killed run may leave a cut last line; it is ignored and the report says so, as it says what else
  is missing (no end record, no model checkpoint, no validation yet).
- Curves are redrawn at each evaluation, but drawing is throttled to about 5% of the wall time
  (LiveCurves: the next drawing waits 20 times as long as the last one took, the first one 20 s),
  so frequent evaluations and short runs never make plotting a cost; the end of a run always draws.
- The seed promised loss levels per epoch ("Epoch 1: ~5-10, Epoch 3: ~2-3, Epoch 5: ~1-2"). Those are
  nats per token of a word-level vocabulary of 4,754 words (rare words folded into one unknown
  token), so they are not comparable with pakar's nats per BPE token; the report shows both, and bits
  per byte as the comparable figure.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pakar import PakarError
from pakar.args import TENSORBOARD_HINT
from pakar.plots import (PLOT_HINT, MissingMatplotlib, plot_expert_load, plot_loss, plot_series,
                         plot_validation)

METRICS = "metrics.jsonl"
REPORT = "report.md"
CURVES = "curves"  # the PNG folder inside the run directory
TENSORBOARD = "tensorboard"  # the event-file folder inside the run directory
CURVE_FILES = ("loss.png", "validation.png", "lr.png", "throughput.png", "experts.png")

# The seed's README ("Training Tips"): training loss in nats per word-level token, per epoch.
SEED_PROMISE = {1: (5.0, 10.0), 3: (2.0, 3.0), 5: (1.0, 2.0)}
SEED_VOCAB = 4754
# Bytes of UTF-8 text per word (with its space) in Indonesian, measured by pakar on id_general:
# 3.96 bytes per BPE token x 1.84 tokens per word (README, "Tokenizer"). Used only to say what the
# seed's per-word losses would mean per byte if every one of its tokens were a whole known word.
BYTES_PER_WORD = 7.29
LN2 = math.log(2.0)

# Drawing may take at most this share of the wall time between evaluations (LiveCurves).
CURVE_TIME_SHARE = 0.05
# What the first drawing is assumed to cost before it is measured (importing matplotlib and drawing the
# five figures takes 1-2 s on a laptop CPU): no curve is drawn before FIRST_DRAW_GUESS / CURVE_TIME_SHARE
# = 20 s of training, so a run of a few seconds gets its curves once, at the end.
FIRST_DRAW_GUESS = 1.0


@dataclass
class Records:
    """The last run of a metrics.jsonl: its records by kind, deduplicated across resumes."""

    start: dict | None = None  # the run's first start record: its settings
    last_start: dict | None = None  # the last process's start record
    end: dict | None = None  # the last process's end record, None when it did not end (killed, running)
    train: dict = field(default_factory=dict)  # step -> record
    val: dict = field(default_factory=dict)  # (step, base_model) -> record
    skips: dict = field(default_factory=dict)  # step -> record
    samples: dict = field(default_factory=dict)  # step -> record
    processes: int = 0  # start records of this run (1 + resumes)
    earlier_runs: int = 0  # runs before this one in the same file (--overwrite keeps appending)
    cut_line: bool = False  # the last line was cut (a killed write)
    bad_lines: list = field(default_factory=list)  # line numbers that are not JSON objects

    @property
    def vals(self) -> list[dict]:
        """Validations of the trained model, by step (the base model's "before" one left out)."""
        return [r for (_, base), r in sorted(self.val.items()) if not base]

    @property
    def base_val(self) -> dict | None:
        return next((r for (_, base), r in self.val.items() if base), None)

    @property
    def last_step(self) -> int:
        return max([0, *self.train, *self.skips, *(s for s, _ in self.val)])

    def drop_after(self, step: int) -> None:
        for d in (self.train, self.skips, self.samples):
            for s in [s for s in d if s > step]:
                del d[s]
        for key in [k for k in self.val if k[0] > step]:
            del self.val[key]


def read_metrics(path: str | Path) -> Records:
    """Parse metrics.jsonl (see the module docstring for how runs and resumes are told apart)."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").splitlines()
    rec = Records()
    pending_base: list[dict] = []  # "before fine-tuning" validations since the last start
    val_keys: set = set()  # validations of the current process: the first at a step is kept
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not isinstance(r, dict) or "kind" not in r:
            if i == len(lines) - 1 and not data.endswith(b"\n"):
                rec.cut_line = True
            else:
                rec.bad_lines.append(i + 1)
            continue
        kind = r["kind"]
        if kind == "start":
            if not r.get("resume"):
                if rec.start is not None or rec.train or rec.vals:
                    rec.earlier_runs += 1
                rec = Records(cut_line=rec.cut_line, bad_lines=rec.bad_lines, earlier_runs=rec.earlier_runs)
                for b in pending_base:
                    rec.val[(b.get("step", 0), True)] = b
            else:
                rec.drop_after(int(r.get("step", 0)))
            rec.start = rec.start or r
            rec.last_start, rec.end = r, None
            rec.processes += 1
            pending_base, val_keys = [], set()
        elif kind == "end":
            rec.end = r
        elif kind == "train" and "step" in r:
            rec.train[r["step"]] = r
        elif kind == "skip" and "step" in r:
            rec.skips[r["step"]] = r
        elif kind == "sample" and "step" in r:
            rec.samples[r["step"]] = r
        elif kind == "val" and "step" in r:
            base = bool(r.get("base_model"))
            key = (r["step"], base)
            if key not in val_keys:  # an epoch end's validation, not the same numbers again at the next
                rec.val[key] = r     # epoch's first --eval-every (same step, same weights, next epoch)
                val_keys.add(key)
            if base:
                pending_base.append(r)
    return rec


def is_dense(rec: Records) -> bool:
    """The start record's model has no experts (num_experts 0 or absent from its config)."""
    cfg = (rec.start or {}).get("model_config")
    return cfg is not None and not cfg.get("num_experts")


def expert_figures(fraction) -> list[dict] | None:
    """Per layer: min and max share of routed tokens, max over mean, idle experts; None for a dense
    model or a record without expert loads."""
    if not fraction or not any(fraction):
        return None
    rows = []
    for row in fraction:
        if not row:
            return None
        mean = sum(row) / len(row)
        rows.append({"min": min(row), "max": max(row), "max_over_mean": max(row) / mean if mean else 0.0,
                     "idle": sum(1 for x in row if x == 0), "experts": len(row)})
    return rows


# --- curves --------------------------------------------------------------------------------------------

def run_title(rec: Records, run_dir: Path) -> str:
    s = rec.start or {}
    args = s.get("args", {})
    bits = [Path(run_dir).resolve().name, args.get("config")]
    if s.get("n_params"):
        bits.append(f"{s['n_params']:,} params")
    return " | ".join(str(b) for b in bits if b)


def draw_curves(rec: Records, run_dir: str | Path) -> list[Path]:
    """Draw the curves the records allow into run_dir/curves; delete those they no longer allow (a
    previous run's images). MissingMatplotlib when matplotlib is not installed."""
    run_dir = Path(run_dir)
    folder = run_dir / CURVES
    title = run_title(rec, run_dir)
    steps = sorted(rec.train)
    written = []
    vals = rec.vals
    if steps or vals:
        written.append(plot_loss(folder / "loss.png", steps, [rec.train[s]["loss"] for s in steps],
                                 [v["step"] for v in vals], [v["loss"] for v in vals], f"{title}\nloss"))
    if vals:
        written.append(plot_validation(folder / "validation.png", [v["step"] for v in vals],
                                       [v.get("bits_per_byte") for v in vals], [v["loss"] for v in vals], title))
    lr = [(s, rec.train[s]["lr"]) for s in steps if rec.train[s].get("lr") is not None]
    if lr:
        written.append(plot_series(folder / "lr.png", *zip(*lr), "learning rate", f"{title}\nlearning rate"))
    tps = [(s, rec.train[s]["tokens_per_s"]) for s in steps if rec.train[s].get("tokens_per_s") is not None]
    if tps:
        written.append(plot_series(folder / "throughput.png", *zip(*tps), "tokens per second",
                                   f"{title}\ntraining throughput (all processes)", color="tab:cyan", sci=False))
    last = next((v for v in reversed(vals) if expert_figures(v.get("expert_fraction"))), None)
    if last is not None and not is_dense(rec):
        imb = [(s, rec.train[s]["imbalance"]) for s in steps if rec.train[s].get("imbalance") is not None]
        vimb = [(v["step"], max(r["max_over_mean"] for r in expert_figures(v["expert_fraction"])))
                for v in vals if expert_figures(v.get("expert_fraction"))]
        written.append(plot_expert_load(folder / "experts.png", [s for s, _ in imb], [x for _, x in imb],
                                        [s for s, _ in vimb], [x for _, x in vimb], last["expert_fraction"],
                                        f"{title} | last validation at step {last['step']}"))
    names = {p.name for p in written}
    for name in CURVE_FILES:
        if name not in names:
            (folder / name).unlink(missing_ok=True)
    return written


class LiveCurves:
    """The training loop's curves: refresh() at each evaluation redraws them unless drawing would take
    more than CURVE_TIME_SHARE of the time since the last drawing. Without matplotlib it stops trying,
    silently: write_report says it once, at the end of the run."""

    def __init__(self, run_dir: Path, say):
        self.run_dir, self.say = Path(run_dir), say
        self.off = False
        self.next_at = time.perf_counter() + FIRST_DRAW_GUESS / CURVE_TIME_SHARE

    def refresh(self) -> None:
        now = time.perf_counter()
        if self.off or now < self.next_at:
            return
        try:
            draw_curves(read_metrics(self.run_dir / METRICS), self.run_dir)
        except MissingMatplotlib:
            self.off = True
            return
        except Exception as e:  # a drawing problem must never stop the training it describes
            self.say(f"curves: not drawn ({type(e).__name__}: {e}); training goes on")
            self.off = True
            return
        cost = time.perf_counter() - now
        self.next_at = time.perf_counter() + cost / CURVE_TIME_SHARE


# --- TensorBoard ----------------------------------------------------------------------------------------

TB_KINDS = ("train", "val", "skip")  # records whose numbers become scalars
TB_SKIP_FIELDS = ("kind", "step", "epoch")


def tensorboard_writer(run_dir: str | Path):
    """A SummaryWriter writing into run_dir/tensorboard. A resumed run adds an event file there;
    TensorBoard drops the killed process's steps that the resume replays (it purges events whose step
    goes back, its purge_orphaned_data)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: the optional tensorboard package
    except ImportError:
        raise PakarError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))


def to_tensorboard(writer, fields: dict) -> None:
    """One metrics.jsonl record as scalars "<kind>/<field>" at its step (numbers only)."""
    kind = fields.get("kind")
    if kind not in TB_KINDS or "step" not in fields:
        return
    for key, value in fields.items():
        if key in TB_SKIP_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{kind}/{key}", value, fields["step"])
    if kind == "val":
        writer.flush()  # evaluations are rare: make them visible (and safe from a kill) at once


# --- report.md ------------------------------------------------------------------------------------------

def write_report(run_dir: str | Path, say=print) -> dict:
    """Curves and report.md for the run in run_dir, from its metrics.jsonl; returns the figures the
    report states (also `pakar report --json`). PakarError for a folder that holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PakarError(f"{run_dir}: no such folder")
    path = run_dir / METRICS
    if not path.is_file():
        raise PakarError(f"{run_dir} is not a run folder: it has no {METRICS} (written by pakar train and "
                         f"pakar finetune)")
    rec = read_metrics(path)
    if not (rec.train or rec.val or rec.start):
        raise PakarError(f"{path} holds no training records yet")
    try:
        curves = draw_curves(rec, run_dir)
        curve_note = None
    except MissingMatplotlib:
        curves, curve_note = [], f"Curves not drawn: matplotlib is not installed ({PLOT_HINT})."
        say(f"report: matplotlib is not installed, so report.md has no curves ({PLOT_HINT})")
    figures = summarize(rec, run_dir)
    text = render(rec, figures, run_dir, curves, curve_note)
    out = run_dir / REPORT
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # pakar.checkpoint's temporary-file pattern
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return {**figures, "report": str(out), "curves": [str(p) for p in curves]}


def summarize(rec: Records, run_dir: Path) -> dict:
    """The numbers of the report card."""
    vals = rec.vals
    final = vals[-1] if vals else None
    best = min(vals, key=lambda v: v["loss"]) if vals else None
    with_bpb = [v for v in vals if v.get("bits_per_byte") is not None]
    best_bpb = min(with_bpb, key=lambda v: v["bits_per_byte"]) if with_bpb else None
    full = [r for _, r in sorted(rec.train.items()) if "tokens_seen" in r]
    end = rec.end or {}
    timed = [r for r in [*rec.train.values(), *vals] if r.get("elapsed") is not None]
    last_timed = max(timed, key=lambda r: r["elapsed"]) if timed else None
    ck = run_dir / "checkpoints"
    models = sorted(p.name for p in ck.glob("*.pt")) if ck.is_dir() else []
    return {
        "status": ("finished" if rec.end and not end.get("stopped") else
                   f"ended early: {end['stopped']}" if rec.end else "no end record"),
        "steps": end.get("steps", rec.last_step),
        "total_steps": (rec.last_start or {}).get("total_steps"),
        "epochs_completed": end.get("epochs_completed"),
        "tokens_seen": end.get("tokens_seen", full[-1]["tokens_seen"] if full else None),
        "tokens_seen_at_step": end.get("steps", full[-1]["step"] if full else None),
        "seconds": end.get("seconds", last_timed["elapsed"] if last_timed else None),
        "skipped_steps": len(rec.skips),
        "final_train_loss": rec.train[max(rec.train)]["loss"] if rec.train else None,
        "final_val": _val_figures(final),
        "best_val": _val_figures(best),
        "best_val_bpb": _val_figures(best_bpb),
        "base_val": _val_figures(rec.base_val),
        "checkpoints": models,
        "processes": rec.processes,
        "cut_line": rec.cut_line,
        "bad_lines": rec.bad_lines,
        "earlier_runs": rec.earlier_runs,
    }


def _val_figures(v: dict | None) -> dict | None:
    if v is None:
        return None
    return {"step": v["step"], "epoch": v.get("epoch"), "loss": v["loss"], "bits_per_byte": v.get("bits_per_byte"),
            "perplexity": v.get("perplexity"), "tokens": v.get("tokens")}


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return f"{x:,}" if isinstance(x, int) else str(x)


def _duration(seconds) -> str:
    if seconds is None:
        return "unknown"
    s = float(seconds)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def render(rec: Records, fig: dict, run_dir: Path, curves: list[Path], curve_note: str | None) -> str:
    s = rec.start or {}
    args = s.get("args", {})
    out = [f"# Run report: {run_dir.resolve().name}", ""]
    out += [f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `{METRICS}` (rebuild any time with "
            f"`pakar report {run_dir}`). Status: **{fig['status']}**, step {fig['steps']:,}"
            + (f" of {fig['total_steps']:,}" if fig["total_steps"] else "") + ".", ""]
    out += _missing(rec, fig)
    out += _settings(s, args)
    out += _progress(s, fig)
    out += _validation(rec, fig)
    out += ["## Curves", ""]
    if curve_note:
        out += [curve_note, ""]
    names = {p.name: p for p in curves}
    labels = {"loss.png": "training and validation loss", "validation.png": "validation bits per byte and loss",
              "lr.png": "learning rate", "throughput.png": "tokens per second", "experts.png": "expert load"}
    for name in CURVE_FILES:
        if name in names:
            out += [f"![{labels[name]}]({CURVES}/{name})", ""]
    if not curves and not curve_note:
        out += ["No curve yet: no training step was recorded.", ""]
    out += _seed_comparison(rec, s)
    out += _experts(rec)
    out += _samples(rec)
    return "\n".join(out).rstrip() + "\n"


def _missing(rec: Records, fig: dict) -> list[str]:
    notes = []
    if rec.end is None:
        notes.append(f"The run has **no end record**: it was killed, crashed, or is still running. The figures "
                     f"are those of the last record (step {rec.last_step:,}).")
    if rec.cut_line:
        notes.append(f"The last line of `{METRICS}` is cut (a write interrupted by the stop) and was ignored.")
    if rec.bad_lines:
        notes.append(f"{len(rec.bad_lines)} line(s) of `{METRICS}` are not JSON records and were ignored "
                     f"(line {', '.join(map(str, rec.bad_lines[:5]))}{', ...' if len(rec.bad_lines) > 5 else ''}).")
    if rec.start is None:
        notes.append("No start record (a run from before pakar wrote one, or its first lines are lost): "
                     "the settings are unknown.")
    if not any(n.startswith(("model_", "lora_")) for n in fig["checkpoints"]):
        notes.append("No model checkpoint in `checkpoints/`"
                     + (f" (only {', '.join(fig['checkpoints'])}: continue with --resume)." if fig["checkpoints"]
                        else "."))
    if not rec.vals:
        notes.append("No validation was recorded yet.")
    if rec.earlier_runs:
        notes.append(f"`{METRICS}` also holds {rec.earlier_runs} earlier run(s) in this folder (replaced with "
                     f"--overwrite); only the last run is reported.")
    if not notes:
        return []
    return ["## What is missing", ""] + [f"- {n}" for n in notes] + [""]


def _settings(s: dict, args: dict) -> list[str]:
    if not s:
        return []
    out = ["## Settings", "", "| setting | value |", "| --- | --- |"]
    data = args.get("data")
    rows = [("preset (--config)", args.get("config")),
            ("parameters (total / active per token)", f"{_f(s.get('n_params'))} / {_f(s.get('active_params'))}"),
            ("data (--data)", " ".join(data) if data else "the embedded sample corpus"),
            ("sequence length", args.get("seq_len")),
            ("batch (per device) x grad-accum x processes",
             f"{args.get('batch')} x {args.get('grad_accum')} x {s.get('world_size', 1)} ({s.get('mode', 'single')})"),
            ("tokens per optimizer step", _f(s.get("tokens_per_step"))),
            ("peak learning rate, warmup, schedule",
             f"{s.get('peak_lr', args.get('lr'))}, {s.get('warmup')} warmup step(s), {args.get('schedule')}"),
            ("epochs, planned optimizer steps", f"{args.get('epochs')}, {_f(s.get('total_steps'))}"),
            ("device, precision", f"{s.get('device')}, {s.get('precision')}")]
    shown = {"config", "data", "seq_len", "batch", "grad_accum", "lr", "schedule", "epochs"}
    rows += [(f"--{k.replace('_', '-')}", v) for k, v in args.items()
             if k not in shown and v not in (None, False, [], "")]
    out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return out + [""]


def _progress(s: dict, fig: dict) -> list[str]:
    out = ["## Data and progress", ""]
    if s.get("train_tokens") is not None:
        out.append(f"- Training data: {s['train_tokens']:,} tokens"
                   + (f", {s['val_tokens']:,} held out for validation" if s.get("val_tokens") is not None else "")
                   + (f" (vocabulary {s['vocab_size']:,})" if s.get("vocab_size") else "") + ".")
    if s.get("train_conversations") is not None:
        out.append(f"- Training data: {s['train_conversations']:,} conversations (chat fine-tuning; the loss "
                   f"counts assistant tokens only).")
    if s.get("steps_per_epoch") and s.get("tokens_per_step"):
        out.append(f"- One epoch: {s['steps_per_epoch']:,} optimizer steps of up to {s['tokens_per_step']:,} "
                   f"tokens = up to {s['steps_per_epoch'] * s['tokens_per_step']:,} tokens.")
    seen = fig["tokens_seen"]
    out.append(f"- Tokens seen: {_f(seen)}" + (f" (at step {fig['tokens_seen_at_step']:,})"
                                                if seen is not None and fig["status"] == "no end record" else "")
               + f"; optimizer steps: {fig['steps']:,}"
               + (f"; epochs completed: {fig['epochs_completed']}" if fig["epochs_completed"] is not None else "")
               + ".")
    sec = fig["seconds"]
    out.append(f"- Training time: {_duration(sec)}" + (f" ({seen / sec:,.0f} tokens/s on average)"
                                                        if seen and sec else "")
               + (f", over {fig['processes']} processes (resumed)" if fig["processes"] > 1 else "") + ".")
    if fig["skipped_steps"]:
        out.append(f"- Skipped steps (NaN/inf loss or gradient): {fig['skipped_steps']}.")
    return out + [""]


def _validation(rec: Records, fig: dict) -> list[str]:
    out = ["## Validation", ""]
    if not rec.vals:
        return out + ["No validation yet.", ""]
    out += ["| | step | loss (nats/token) | bits per byte | perplexity |", "| --- | --- | --- | --- | --- |"]
    rows = [("final", fig["final_val"]), ("best (loss)", fig["best_val"])]
    if fig["best_val_bpb"] and fig["best_val_bpb"]["step"] != fig["best_val"]["step"]:
        rows.append(("best (bits per byte)", fig["best_val_bpb"]))
    if fig["base_val"]:
        rows.append(("base model, before fine-tuning", fig["base_val"]))
    for name, v in rows:
        out.append(f"| {name} | {v['step']:,} | {_f(v['loss'])} | {_f(v['bits_per_byte'])} | "
                   f"{_f(v['perplexity'], 2)} |")
    out += ["", f"Final training loss (last step): {_f(fig['final_train_loss'])} nats/token. Bits per byte "
            f"(nats per UTF-8 byte of the held-out text / ln 2) does not depend on the tokenizer; the loss "
            f"in nats per token does.", ""]
    vals = rec.vals
    if len(vals) > 1:
        shown = vals if len(vals) <= 20 else vals[:: math.ceil(len(vals) / 19)] + [vals[-1]]
        out += ["All validations" + ("" if shown is vals else f" ({len(shown)} of {len(vals)} shown)") + ":", "",
                "| step | epoch | loss | bits per byte |", "| --- | --- | --- | --- |"]
        seen = set()
        for v in shown:
            if v["step"] not in seen:
                seen.add(v["step"])
                out.append(f"| {v['step']:,} | {v.get('epoch', '–')} | {_f(v['loss'])} | {_f(v.get('bits_per_byte'))} |")
        out.append("")
    return out


def epoch_figures(rec: Records, steps_per_epoch: int | None) -> dict[int, dict]:
    """Per epoch the run trained in: mean training loss over its steps, and the validation at its end
    (the one at step epoch x steps_per_epoch; without the plan, the epoch's last validation)."""
    by_epoch: dict[int, list[float]] = {}
    for r in rec.train.values():
        by_epoch.setdefault(r.get("epoch"), []).append(r["loss"])
    out = {}
    for e, losses in by_epoch.items():
        if e is None:
            continue
        in_epoch = [v for v in rec.vals if v.get("epoch") == e]
        end = [v for v in in_epoch if steps_per_epoch and v["step"] == e * steps_per_epoch]
        val = end[-1] if end else (in_epoch[-1] if in_epoch else None)
        out[e] = {"train_loss": sum(losses) / len(losses), "steps": len(losses), "val": val,
                  "complete": bool(steps_per_epoch) and len(losses) >= steps_per_epoch}
    return out


def _seed_comparison(rec: Records, s: dict) -> list[str]:
    per = epoch_figures(rec, s.get("steps_per_epoch"))
    out = ["## Against the seed's promise", "",
           "The seed's README promised these training losses: \"Epoch 1: ~5-10, Epoch 3: ~2-3, Epoch 5: ~1-2\". "
           f"They are nats per token of its word-level vocabulary of {SEED_VOCAB:,} words (with rare words folded "
           "into one unknown token), while pakar's are nats per BPE token: the two are not on the same scale. "
           "Bits per byte, measured on held-out text, is the comparable figure.", "",
           "| epoch | seed promised (nats per word-token) | the promise in bits per byte, were its tokens whole "
           "words (see below) | this run: training loss, epoch mean (nats/token) | this run: validation loss "
           "(nats/token) | this run: validation bits per byte |",
           "| --- | --- | --- | --- | --- | --- |"]
    for e in sorted(set(SEED_PROMISE) | set(per)):
        promise = SEED_PROMISE.get(e)
        p = per.get(e)
        val = p["val"] if p else None
        ran = ("not reached" if p is None else
               f"{_f(p['train_loss'])}" + ("" if p["complete"] or not s.get("steps_per_epoch")
                                          else f" ({p['steps']:,} of {s['steps_per_epoch']:,} steps)"))
        as_bpb = (f"~{promise[0] / (LN2 * BYTES_PER_WORD):.2f}-{promise[1] / (LN2 * BYTES_PER_WORD):.2f}"
                  if promise else "–")
        out.append(f"| {e} | {f'~{promise[0]:g}-{promise[1]:g}' if promise else '–'} | {as_bpb} | {ran} | "
                   f"{_f(val['loss']) if val else '–'} | {_f(val.get('bits_per_byte')) if val else '–'} |")
    out += ["", f"The bits-per-byte column supposes every seed token a whole, known word of {BYTES_PER_WORD} bytes "
            "(Indonesian text with its space, as pakar measured on id_general): nats per word / (ln 2 x bytes per "
            "word). It flatters the seed: its figures are training losses over a vocabulary that folds rare words "
            "(18% of the words of id_general) into one unknown token, which is easy to predict and carries none "
            "of their bytes. This run's validation bits per byte is measured on held-out text.", ""]
    return out


def _experts(rec: Records) -> list[str]:
    out = ["## Expert utilisation", ""]
    last = next((v for v in reversed(rec.vals) if expert_figures(v.get("expert_fraction"))), None)
    if is_dense(rec) or last is None and rec.vals and all("expert_fraction" in v for v in rec.vals):
        return out + ["A dense model: no experts.", ""]
    if last is None:
        return out + ["No expert loads recorded (no validation with expert loads yet).", ""]
    rows = expert_figures(last["expert_fraction"])
    E = rows[0]["experts"]
    lo = min(r["min"] for r in rows)
    hi = max(r["max"] for r in rows)
    out += [f"At the last validation (step {last['step']:,}), share of routed tokens per expert: lowest "
            f"{100 * lo:.1f}%, highest {100 * hi:.1f}% (balanced: {100 / E:.1f}% each of {E} experts).", "",
            "| layer | min share | max share | max / mean | idle experts |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {i} | {100 * r['min']:.1f}% | {100 * r['max']:.1f}% | {r['max_over_mean']:.2f} | {r['idle']} |"
            for i, r in enumerate(rows)]
    imb = [(s, r["imbalance"]) for s, r in sorted(rec.train.items()) if r.get("imbalance") is not None]
    if len(imb) >= 2:
        out += ["", f"During training, max/mean load of the worst layer went from {imb[0][1]:.2f} (step "
                f"{imb[0][0]:,}) to {imb[-1][1]:.2f} (step {imb[-1][0]:,})."]
    return out + [""]


def _samples(rec: Records) -> list[str]:
    out = ["## Samples", ""]
    if not rec.samples:
        return out + ["No sample was logged (a text run draws a greedy sample at each epoch end and when "
                      "--max-steps or --time-limit stops it).", ""]
    for step, r in sorted(rec.samples.items())[-5:]:
        out += [f"Step {step:,} (epoch {r.get('epoch')}), greedy, from the prompt {r.get('prompt', '')!r}:", "",
                "```", str(r.get("text", "")), "```", ""]
    return out
