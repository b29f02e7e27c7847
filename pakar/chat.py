"""Talking to a checkpoint from the terminal: `pakar chat` (the seed's chat_interactive.py), a REPL that
streams answers, and `pakar chat-batch` (the seed's test_chat_batch.py), a batched run over a prompt
list that writes a report. Their parsers are in pakar.commands.chat; this module is the library they
call: load_generator (the one loader of chat, chat-batch and serve), ChatSession, repl, run_batch.

Design choices:

- Both sit on pakar.generate.TextGenerator; nothing here touches tokens or the cache.
- Mode. A checkpoint whose meta says "chat": True (chat fine-tuned) gets the ChatML template and a
  conversation; a pretrained-only checkpoint continues text: each line typed is a document start
  that the model continues, with no history (the REPL says so on start). `--mode` overrides.
- History policy (chat mode): before each answer the oldest turns are dropped until the prompt
  leaves min(max new tokens, half the window) tokens for the answer; the system prompt stays while
  it fits. The REPL says how many turns it dropped. A message too long on its own is refused with
  a one-line notice, and the REPL goes on.
- Ctrl-C while an answer streams stops that answer (what was shown stays in the history) and returns
  to the prompt; Ctrl-C at the prompt only explains how to leave; Ctrl-D or /quit leaves.
- chat-batch runs prompts with continuous batching: up to --batch-size rows decode together and a
  finished row's place goes to the next prompt at once. Each prompt gets seed --seed + its index, so
  its answer does not depend on the batch size. Per-prompt tokens/s is that row's own rate (tokens
  over the time from its prefill to its last token, shared with the other rows); the summary adds the
  aggregate rate. Reports: `<out>/chat_batch_<checkpoint>.jsonl` and `.md`.
- --index DIR (retrieval, pakar/rag.py): each user turn is searched in the index and asked in the
  RAG template with numbered sources; the history keeps the plain questions and answers, as many
  recent turns as fit in a quarter of the window, so old passages never crowd out new ones. Sources
  are printed under each answer and written to the chat-batch report ("sources").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from pakar import PakarError, what_is_there
from pakar.checkpoint import latest_epoch_checkpoint, safe_load
from pakar.engine import SamplingParams
from pakar.generate import ContextLengthError, Request, TextGenerator
from pakar.hf import import_folder
from pakar.rag import format_sources
from pakar.runtime import inference_dtype, resolve_device
from pakar.tokenizer import validate_messages

# The seed's topics: teknologi, pengetahuan umum, topik ringan, jurnal. Each entry has a question for
# chat models and an opening for models that only continue text.
DEFAULT_PROMPTS = [
    ("teknologi", "Apa itu kecerdasan buatan dan bagaimana cara kerjanya?",
     "Kecerdasan buatan adalah"),
    ("teknologi", "Jelaskan perbedaan antara perangkat keras dan perangkat lunak.",
     "Perbedaan antara perangkat keras dan perangkat lunak adalah"),
    ("teknologi", "Bagaimana cara menjaga keamanan kata sandi di internet?",
     "Untuk menjaga keamanan kata sandi di internet, kita perlu"),
    ("pengetahuan umum", "Apa ibu kota Indonesia dan di pulau mana letaknya?",
     "Ibu kota Indonesia adalah"),
    ("pengetahuan umum", "Mengapa Indonesia memiliki banyak gunung berapi?",
     "Indonesia memiliki banyak gunung berapi karena"),
    ("pengetahuan umum", "Sebutkan beberapa suku bangsa yang ada di Indonesia.",
     "Suku bangsa di Indonesia antara lain"),
    ("topik ringan", "Apa makanan khas Indonesia yang paling kamu sukai?",
     "Makanan khas Indonesia yang paling terkenal adalah"),
    ("topik ringan", "Berikan tips agar tetap semangat di pagi hari.",
     "Agar tetap semangat di pagi hari,"),
    ("topik ringan", "Ceritakan tentang liburan yang menyenangkan di Bali.",
     "Liburan di Bali sangat menyenangkan karena"),
    ("jurnal", "Tuliskan abstrak singkat penelitian tentang pengaruh media sosial terhadap remaja.",
     "Abstrak. Penelitian ini bertujuan untuk mengetahui pengaruh media sosial terhadap"),
    ("jurnal", "Apa saja bagian utama dari sebuah artikel jurnal ilmiah?",
     "Sebuah artikel jurnal ilmiah terdiri dari"),
    ("jurnal", "Jelaskan metode penelitian kualitatif secara singkat.",
     "Metode penelitian kualitatif adalah"),
]

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (/system with no text removes it); resets the conversation
  /temp X         temperature (0 = greedy)
  /topk N         keep the N most likely tokens (0 = off)
  /topp X         nucleus sampling mass, in (0, 1] (1 = off)
  /max N          maximum new tokens per answer
  /help           this list
  /quit           leave (or Ctrl-D)
Ctrl-C stops an answer while it is being written."""


# --- loading a model ----------------------------------------------------------------------------------

def load_generator(checkpoint: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                   device: str = "auto", dtype: str = "auto", mode: str = "auto",
                   quantize: str | None = None) -> tuple[TextGenerator, Path]:
    """(TextGenerator, the file or folder it came from) for chat, chat-batch and serve: a pakar checkpoint,
    or a Hugging Face Qwen3-MoE folder (model_dir); neither = the newest epoch checkpoint in the current
    folder. device/dtype are flag values (pakar.runtime: dtype auto = bf16 on a GPU that supports it);
    mode auto = chat when the checkpoint was chat fine-tuned; quantize "int8" = 8-bit weights (CPU)."""
    if checkpoint is not None and model_dir is not None:
        raise PakarError("give only one of --checkpoint PATH or --model DIR")
    if checkpoint is None and model_dir is None:  # like chat and eval: the newest epoch checkpoint here
        checkpoint = latest_epoch_checkpoint(".")
    torch_device = resolve_device(device)
    if checkpoint is not None:
        path, ckpt = Path(checkpoint), safe_load(checkpoint)
    else:
        path, ckpt = Path(model_dir), import_folder(model_dir)
    chat = None if mode == "auto" else mode == "chat"
    return TextGenerator.from_ckpt(ckpt, torch_device, inference_dtype(dtype, torch_device), chat,
                                   quantize=quantize), path


def default_model_name(path: Path) -> str:
    """The model id a server reports for `path`: a checkpoint's file stem, a folder's own name."""
    return path.resolve().name if path.is_dir() else path.stem


def describe(textgen: TextGenerator, path: Path) -> str:
    n = sum(p.numel() for p in textgen.engine.model.parameters())
    cfg = textgen.engine.config
    ffn = "dense" if cfg.dense else f"{cfg.num_experts} experts (top-{cfg.num_experts_per_tok})"
    return (f"{path} | {n / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, {ffn} "
            f"| context {textgen.context_window} tokens | {textgen.engine.device}")


# --- the REPL -------------------------------------------------------------------------------------

class ChatSession:
    """The REPL's state and logic, separate from the terminal so that tests can drive it directly."""

    def __init__(self, textgen: TextGenerator, params: SamplingParams, system: str | None = None, out=None,
                 retriever=None):
        self.textgen, self.params, self.system = textgen, params, system
        self.history: list[dict] = []
        self.out = out or sys.stdout
        self.retriever = retriever  # pakar.rag.Retriever: answer from retrieved sources
        self.sources: list = []  # the passages behind the last answer

    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Apply a /command; False when the session should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        setters = {"temp": ("temperature", float), "topk": ("top_k", int), "topp": ("top_p", float),
                   "max": ("max_new_tokens", int)}
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.write(HELP + "\n")
        elif name == "reset":
            self.history.clear()
            self.write("(conversation cleared)\n")
        elif name == "system":
            if not self.textgen.chat:  # one line: nothing is set, nothing is cleared
                self.write("(text mode has no system prompt: this model continues text. A chat model comes "
                           "from `pakar finetune` on chat data; --mode chat forces the chat template)\n")
                return True
            self.system = arg or None
            self.history.clear()
            self.write(f"(system prompt {'set' if arg else 'removed'}; conversation cleared)\n")
        elif name in setters:
            field_, kind = setters[name]
            try:
                self.params = dataclasses.replace(self.params, **{field_: kind(arg)})
                self.write(f"({field_} = {getattr(self.params, field_)})\n")
            except (ValueError, PakarError) as e:
                wanted = "an integer" if kind is int else "a number"
                msg = str(e) if isinstance(e, PakarError) else f"/{name} needs {wanted}, got {arg!r}"
                self.write(f"({msg})\n")
        else:
            self.write(f"(unknown command /{name}; /help lists them)\n")
        return True

    def prompt_for(self, text: str):
        """The prompt for the next answer: the fitted conversation (chat) or the text itself."""
        if self.retriever is not None:
            return self.rag_prompt_for(text)
        if not self.textgen.chat:
            return text
        self.history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        reserve = min(self.params.max_new_tokens, self.textgen.context_window // 2)
        try:
            kept = self.textgen.fit_messages(messages, reserve)
        except ContextLengthError:
            self.history.pop()
            raise
        turns = [m for m in kept if m["role"] != "system"]
        if len(turns) < len(self.history):
            self.write(f"(dropped the {len(self.history) - len(turns)} oldest message(s) to fit the context window)\n")
            self.history = turns
        if self.system and kept[0]["role"] != "system":
            self.write("(the system prompt does not fit the context window with this message; left out)\n")
        return kept

    def rag_prompt_for(self, text: str):
        """The RAG template for `text` (sources in self.sources) after the recent plain history."""
        reserve = min(self.params.max_new_tokens, self.textgen.context_window // 2)
        history: list[dict] = []
        if self.textgen.chat and self.history:
            try:  # recent turns while they fit in a quarter of the window; the rest is for passages
                history = self.textgen.fit_messages(self.history + [{"role": "user", "content": text}],
                                                    self.textgen.context_window * 3 // 4)[:-1]
            except ContextLengthError:
                history = []
        prompt, self.sources = self.retriever.prompt(self.textgen, text, history, reserve,
                                                     self.system if self.textgen.chat else None)
        if self.textgen.chat:
            self.history = history + [{"role": "user", "content": text}]
        return prompt

    def answer(self, text: str) -> str:
        """Stream the model's answer to `text`; Ctrl-C stops it. Returns the answer text."""
        self.sources = []
        try:
            prompt = self.prompt_for(text)
            batch = self.textgen.start([Request(prompt, self.params)])
        except PakarError as e:
            self.write(f"({e})\n")
            return ""
        self.write("model> ")
        t0 = time.perf_counter()
        pieces, n, reason = [], 0, None
        try:
            while batch.active:
                for d in batch.step():
                    self.write(d.text)
                    pieces.append(d.text)
                    reason = d.finish_reason or reason
        except KeyboardInterrupt:
            reason = "interrupted"
        comp = batch.completions.get(0)
        n = comp.completion_tokens if comp else len(pieces)
        dt = time.perf_counter() - t0
        note = {"length": ", length limit", "interrupted": ", stopped"}.get(reason, "")
        self.write(f"\n[{n} tokens, {n / max(dt, 1e-9):.1f} tokens/s{note}]\n")
        if self.sources:
            self.write(f"sources:\n{format_sources(self.sources)}\n")
        answer = "".join(pieces)
        if self.textgen.chat and answer.strip():
            self.history.append({"role": "assistant", "content": answer})
        return answer


def repl(session: ChatSession, read=input) -> None:
    while True:
        try:
            line = read("you> ")
        except EOFError:
            session.write("\n")
            return
        except KeyboardInterrupt:
            session.write("\n(/quit or Ctrl-D to leave)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.answer(line)



# --- chat-batch ---------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[tuple[str, object]]:
    """(label, prompt) pairs from a text file (one prompt per line; blank lines and lines starting with
    '#' skipped) or a JSONL file ({"prompt": str} or {"messages": [...]} per line; optional "topic")."""
    if not path.is_file():
        raise PakarError(f"--prompts {path}: no such file {what_is_there(path)}")
    out = []
    jsonl = path.suffix.lower() == ".jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        if not jsonl:
            out.append(("", line.strip()))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PakarError(f"--prompts {path} line {n}: not JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            out.append((str(obj.get("topic", "")), obj["prompt"]))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            try:
                validate_messages(obj["messages"])
            except PakarError as e:
                raise PakarError(f"--prompts {path} line {n}: {e}") from None
            out.append((str(obj.get("topic", "")), obj["messages"]))
        else:
            raise PakarError(f"--prompts {path} line {n}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
    if not out:
        raise PakarError(f"--prompts {path}: no prompts in the file")
    return out


def _as_request_prompt(prompt, chat: bool, system: str | None):
    """A chat model gets messages (a plain prompt becomes the user's message; --system goes first);
    a text model gets what it was given (TextGenerator joins message contents as text)."""
    if not chat:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _shown(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def run_batch(textgen: TextGenerator, items: list[tuple[str, object]], make_params, batch_size: int,
              on_done=None) -> tuple[list[dict], float]:
    """Answer every prompt with at most `batch_size` rows at a time; a finished row's slot goes to the
    next prompt right away. Returns (rows in prompt order, wall seconds)."""
    requests = [Request(p, make_params(i)) for i, (_, p) in enumerate(items)]
    for i, r in enumerate(requests):  # refuse bad prompts before any work, naming the prompt
        try:
            textgen.check(r)
        except PakarError as e:
            raise PakarError(f"prompt {i + 1} ({_shown(r.prompt)[:40]!r}...): {e}") from None
    t0 = time.perf_counter()
    batch = textgen.start([])
    order: dict[int, int] = {}  # batch index -> prompt index
    nxt = 0
    results: dict[int, dict] = {}
    while nxt < len(requests) or batch.active:
        free = batch_size - batch.active
        if free > 0 and nxt < len(requests):
            group = list(range(nxt, min(len(requests), nxt + free)))
            nxt += len(group)
            order.update(zip(batch.add([requests[i] for i in group]), group))
        for d in batch.step():
            if d.finish_reason is None:
                continue
            c = batch.completions[d.index]
            i = order[d.index]
            topic, prompt = items[i]
            row = {"index": i + 1, "topic": topic, "prompt": _shown(prompt), "answer": c.text,
                   "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                   "finish_reason": c.finish_reason, "time_to_first_token_s": round(c.time_to_first_token, 4),
                   "seconds": round(c.seconds, 4), "tokens_per_s": round(c.completion_tokens / max(c.seconds, 1e-9), 2)}
            results[i] = row
            if on_done:
                on_done(row)
    return [results[i] for i in range(len(items))], time.perf_counter() - t0


def rag_items(textgen: TextGenerator, retriever, items: list[tuple[str, object]], max_new: int):
    """(items with each last message in the RAG template, the hits of each) for chat-batch --index."""
    out, hits_per_item = [], []
    reserve = min(max_new, textgen.context_window // 2)
    for topic, prompt in items:
        question = _shown(prompt)
        history = prompt[:-1] if isinstance(prompt, list) else []
        system = history[0]["content"] if history and history[0]["role"] == "system" else None
        rag_prompt, hits = retriever.prompt(textgen, question, history[1:] if system else history, reserve, system)
        out.append((topic, rag_prompt))
        hits_per_item.append(hits)
    return out, hits_per_item


def write_reports(rows: list[dict], summary: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, md = out_dir / f"chat_batch_{stem}.jsonl", out_dir / f"chat_batch_{stem}.md"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(jsonl)
    lines = [f"# chat-batch report: {summary['checkpoint']}", "",
             f"{summary['prompts']} prompts, mode {summary['mode']}, {summary['completion_tokens']} tokens in "
             f"{summary['seconds']:.1f} s ({summary['tokens_per_s']:.1f} tokens/s aggregate, batch size "
             f"{summary['batch_size']}); sampling: {summary['sampling']}", "",
             "| # | topic | prompt | answer | tokens | tokens/s | finish |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cites = "".join(f"\n[{c['n']}] {c['source']} (document {c['doc'] + 1})" for c in r.get("sources", []))
        lines.append(f"| {r['index']} | {_md_cell(r['topic'])} | {_md_cell(r['prompt'])} | {_md_cell(r['answer'] + cites)} "
                     f"| {r['completion_tokens']} | {r['tokens_per_s']:.1f} | {r['finish_reason']} |")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(md)
    return jsonl, md


