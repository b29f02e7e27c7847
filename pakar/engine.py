"""The generation engine: a model, a KV cache and sampling, over token ids only.

The engine never imports the tokenizer (text, chat templates, stop strings and UTF-8-safe streaming
live in pakar/generate.py). Design choices:

- One `Batch` is a set of rows decoded together: `add()` prefills new prompts (left-padded among
  themselves, one forward with `last_only` logits), `step()` samples one token for every active row
  and returns it at once (streaming), then the next `step()` feeds those tokens through the model.
  Feeding lazily means a token reaches the caller as soon as it is sampled, one forward earlier than
  sample-after-forward would, and no forward is wasted on rows that just finished.
- Rows are independent: each has its own `SamplingParams` (temperature, top-k, top-p, repetition
  penalty, seed, stop tokens, max new tokens) and its own `torch.Generator`, so a seeded row samples
  the same tokens whatever else is in the batch. Rows without a seed draw theirs from torch's global
  RNG when added, so `torch.manual_seed` makes a whole run reproducible.
- Finished and cancelled rows leave the batch at once (the cache, mask and per-row state are
  compacted), so the remaining rows never pay for them. Rows may also join a running batch
  (`add()` again: continuous batching); the cache is then widened on the left if the newcomer's
  prompt is longer than the batch's current length.
- Cache layout: one preallocated `KVCache` of shape (L, B, G, C, K) whose columns are shared by all
  rows; a row of real length n occupies the last n filled columns, the rest is left padding that the
  key mask hides. Each row carries its own rotary positions. When every active row is unpadded the
  mask and position ids are omitted so the model takes its plain fast path.
- The decode step is lean: last-position logits only, one host sync per step (the sampled ids, which
  the caller needs anyway), sorting only for rows that ask for top-k/top-p, `torch.inference_mode`.
- Decode paths, chosen once per Engine: the engine only picks one and orchestrates; the arithmetic
  of each lives in the model files beside the modules' forward and uses their weights, so there is
  one forward per module plus its inference step, not a copy in the engine. Prefill always runs the
  model's forward. Then, per step:
  - on a GPU (or a model that is not a plain pakar Transformer, or in training mode): the model's
    forward with the KV cache (`last_only`);
  - an int8 model (pakar.quant) on a CPU where pakar._int8step was built: pakar.quant.Int8Step, every
    row of the step in one C call (pakar/_int8step.c), with the int8 modules' weights and arithmetic;
  - on a CPU, batch > 1, or a bfloat16 or LoRA-wrapped model (or an int8 one without the C step):
    `Transformer.decode_step`, the model's modules called as modules (so wrappers and int8 modules run as
    they are), minus the losses and expert-count bookkeeping, and with `MoE.forward_chosen` (three small
    matmuls per expert actually chosen, read back to the host: free on a CPU, a sync on a GPU) in place
    of the sort-by-expert grouped matmul that suits thousands of tokens;
  - on a CPU, one row, a stock float32 model or an int8 MoE model without the C step: `RowDecoder`, i.e.
    `Transformer.decode_row`, the same weights and arithmetic as float32 vectors and matrix-vector
    products (Attention.decode_row, MoE.decode_row), in ~41 torch calls per layer of `small` where the
    model's forward makes ~158 (at batch 1 each call's fixed cost, not its arithmetic, is most of what a
    step spends beyond reading the weights). For an int8 model the same step runs with
    pakar.quant.Int8Row's attention, experts and head, one `torch._int_mm` per weight product.
  Why two CPU paths and not one: the row path is ~2x faster per token at batch 1 than decode_step
  but reads the stock (or int8) modules' weights directly, so it cannot run LoRA wrappers or
  several rows. benchmarks/bench_generate.py measures the paths against transformers; the tests
  hold both to the model's own logits and cache.

Context-window policy (W = config.max_position_embeddings): a row's prompt plus its generated tokens
never exceed W tokens. A prompt of W tokens or more raises `ContextLengthError` (a `PakarError`, so the
CLI prints one line and the server answers 400) naming the prompt's length and the window;
`max_new_tokens` is silently capped at W - prompt length, and a row that reaches the window finishes
with reason "length", like one that reaches max_new_tokens. Callers that keep a conversation (the
chat REPL) drop old turns to make room before calling the engine. Cache columns never exceed W:
when a batch's shared columns fill up, columns that are padding for every active row are dropped.

Finish reasons: "stop" (a stop token was sampled; it is reported in the event but is not part of
the row's context afterwards), "length" (max_new_tokens or the context window), "cancelled",
"error" (the row's own sampling distribution was not finite, e.g. from extreme settings that
bypassed the server's validation: that row ends with no token, the other rows go on unchanged).
Usage: completion tokens count every sampled token, the stop token included.

Shape legend: B active rows, V vocabulary, C cache columns, L layers, G key/value heads, K head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from pakar import PakarError
from pakar.model import MLP, Attention, Block, KVCache, RMSNorm, RowScratch, Transformer
from pakar.moe import Experts, MoE, Router
from pakar.quant import Int8Experts, Int8Linear, Int8Row, Int8Step

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class ContextLengthError(PakarError):
    """A prompt does not fit the model's context window (with room for at least one new token)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set of tokens with this much probability; 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL / HF rule)
    seed: int | None = None  # per-row generator seed; None = drawn from torch's global RNG
    stop_token_ids: tuple[int, ...] = ()  # sampling one of these ends the row with reason "stop"

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise PakarError(f"invalid sampling parameter: {msg}")

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        need(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
             and self.temperature >= 0, f"temperature must be a number >= 0, got {self.temperature!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class TokenEvent:
    row: int  # the id add() returned for this row
    token: int | None  # the sampled token; None when a row is cancelled
    finish_reason: str | None  # None while the row continues; else "stop", "length" or "cancelled"


@dataclass
class _Row:
    id: int
    params: SamplingParams
    generator: torch.Generator
    prompt_len: int
    limit: int  # total length (prompt + generated) at which the row stops: min(prompt + max_new, W)
    generated: int = 0
    cancelled: bool = False

    @property
    def length(self) -> int:  # tokens in this row's context after its last sampled token is fed
        return self.prompt_len + self.generated


def process_logits(logits_BV: torch.Tensor, params: Sequence[SamplingParams],
                   seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """The logits each row samples from, float32 (B, V), in Hugging Face's order: repetition penalty
    on the raw logits (CTRL rule: divide positive logits of seen tokens by the penalty, multiply negative
    ones), then temperature, top-k, top-p; filtered tokens are -inf. Rows with temperature 0 (greedy)
    get the penalised logits unscaled and unfiltered: their argmax is the greedy choice.
    `seen_BV` (bool) marks tokens already in each row's prompt or output."""
    logits_BV = logits_BV.float()
    B, V = logits_BV.shape
    dev = logits_BV.device
    pen = [p.repetition_penalty for p in params]
    if seen_BV is not None and any(x != 1.0 for x in pen):
        pen_B1 = torch.tensor(pen, device=dev)[:, None]
        penalised = torch.where(logits_BV > 0, logits_BV / pen_B1, logits_BV * pen_B1)
        logits_BV = torch.where(seen_BV, penalised, logits_BV)
    temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temps):
        logits_BV = logits_BV / torch.tensor(temps, device=dev)[:, None]
    ks = [p.top_k if p.temperature > 0 and 0 < p.top_k < V else V for p in params]
    ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
    if all(k == V for k in ks) and all(p >= 1.0 for p in ps):
        return logits_BV
    vals_BV, idx_BV = logits_BV.sort(dim=-1, descending=True)
    k_B1 = torch.tensor(ks, device=dev)[:, None]
    # top-k keeps ties with the k-th value, as a threshold on the value does (HF's TopKLogitsWarper)
    keep_BV = vals_BV >= vals_BV.gather(1, k_B1 - 1)
    vals_BV = vals_BV.masked_fill(~keep_BV, -math.inf)
    p_B1 = torch.tensor(ps, device=dev, dtype=torch.float32)[:, None]
    probs_BV = vals_BV.softmax(dim=-1)
    # top-p keeps the smallest prefix whose mass reaches top_p: a token goes once the mass before it does
    drop_BV = (probs_BV.cumsum(dim=-1) - probs_BV >= p_B1) & (p_B1 < 1.0)
    drop_BV[:, 0] = False
    vals_BV = vals_BV.masked_fill(drop_BV, -math.inf)
    return torch.full_like(logits_BV, -math.inf).scatter(1, idx_BV, vals_BV)


def sample_tokens(logits_BV: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row, (B,) int64: argmax for greedy rows (temperature 0), otherwise a draw from
    softmax(process_logits(...)) with the row's own generator; -1 for a sampled row whose
    distribution is not finite (the row failed; the others are unaffected)."""
    if seen_BV is None and all(p.temperature == 0 for p in params):  # greedy, no penalty: nothing to process
        return logits_BV.max(dim=-1).indices  # the first maximum, as argmax, in half its time on a CPU
    x_BV = process_logits(logits_BV, params, seen_BV)
    out_B = x_BV.max(dim=-1).indices
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        probs_RV = x_BV[rows].softmax(dim=-1)
        # A row whose distribution is not finite (extreme settings: 1e-300 is 0 in float32) must fail
        # alone: multinomial would raise (or assert on a GPU) for the whole batch. It draws from a
        # harmless stand-in and gets -1, with no extra host sync for the healthy rows.
        bad_R1 = ~probs_RV.isfinite().all(dim=-1, keepdim=True)
        probs_RV = torch.where(bad_R1, torch.ones_like(probs_RV), probs_RV)
        drawn_R = torch.cat([torch.multinomial(probs_RV[j], 1, generator=generators[i])
                             for j, i in enumerate(rows)])
        out_B[rows] = torch.where(bad_R1[:, 0], -1, drawn_R)
    return out_B


def lean_decode_ok(model: torch.nn.Module) -> bool:
    """Whether Transformer.decode_step may stand in for the model's forward: a plain pakar Transformer
    (any attention, norm or dense-MLP submodules, e.g. LoRA-wrapped, are called as modules; an MoE
    block must be the stock one, its experts stock or int8, which bring their own per-expert product),
    in eval mode, on the CPU."""

    return (model.embed_tokens.weight.device.type == "cpu" and not model.training
            and all(type(layer.mlp) is MLP or (type(layer.mlp) is MoE
                                               and type(layer.mlp.experts) in (Experts, Int8Experts))
                    for layer in model.layers))


def _check_window(model, n: int) -> None:
    W = model.config.max_position_embeddings
    if n > W:
        raise ContextLengthError(f"a sequence of {n} tokens exceeds the model's context ({W})")


class RowDecoder:
    """The decode step of a batch with one row (the interactive case: a chat, one client) on the CPU
    in float32: Transformer.decode_row, with its RowScratch built once.

    Why a separate path: at batch 1 a step is a chain of matrix-vector products over the active
    weights (which the model's forward and transformers pay alike: on this project's 2-core CPU
    ~1.8 ms per token of `small`, ~0.2 ms of `tiny`; benchmarks/bench_generate.py measures it) plus
    several hundred small operators, each costing microseconds of dispatch whatever its size. The
    row path cuts the operators to ~41 torch calls per layer (the model's forward: ~158,
    Transformer.decode_step: ~109; counted with a TorchFunctionMode on `small`): 1-D vectors and
    `addmv`/`mv` (a BLAS gemv, faster than the gemm behind F.linear for one row), each RMSNorm of the
    residual stream as one dot product whose scalar the next products take as `alpha`, the o_proj and
    down-projection products accumulated straight into the residual stream; the arithmetic lives
    beside each module's forward (Attention.decode_row, MoE.decode_row, Block.decode_row).
    Float32 only: at these sizes a bfloat16 matrix-vector product on a CPU (oneDNN) costs more than the
    float32 one (BLAS), so bfloat16 models take Transformer.decode_step. Stock modules only: it reads
    the weights of the model's modules directly, which a LoRA wrapper would bypass.
    An int8 MoE model (pakar.quant) runs the same step with Int8Row's products in place of the float32
    ones. The tests hold it to the model's own forward (int8: to its module step); `Engine` uses it
    when `applies(model)`.
    """

    def __init__(self, model):
        self.model = model
        if Int8Row.applies(model):
            int8 = Int8Row(model)
            self.scratch = RowScratch(model, int8.layers, int8.head)
        else:
            self.scratch = RowScratch(model)

    @staticmethod
    def applies(model) -> bool:
        """A stock pakar Transformer (no LoRA or other wrapped modules), float32 (an int8 MoE model's
        int8 modules included: pakar.quant.Int8Row), eval mode, CPU."""
        stock = {Transformer, torch.nn.ModuleList, Block, Attention, RMSNorm, torch.nn.Linear,
                 torch.nn.Embedding, MoE, Router, Experts, MLP}
        int8 = {Int8Linear, Int8Experts}
        types = {type(m) for m in model.modules()}
        return (lean_decode_ok(model) and all(p.dtype == torch.float32 for p in model.parameters())
                and types <= stock | int8 and (types.isdisjoint(int8) or Int8Row.applies(model)))

    def __call__(self, token: int, cache: KVCache, n: int) -> torch.Tensor:
        """Feed `token` as the n-th token of the only row in `cache` (its earlier n - 1 tokens fill the
        last n - 1 columns; any columns before are left padding); returns the next-token logits (1, V)."""
        _check_window(self.model, n)
        return self.model.decode_row(token, cache, n, self.scratch)


class Engine:
    """Generation over `model` (a pakar Transformer; put in eval mode). Not thread-safe: drive each
    engine from one thread; several Batches may be stepped in turn."""

    def __init__(self, model: torch.nn.Module, lean: bool | None = None):
        self.model = model.eval()
        self.config = model.config
        self.context_window = model.config.max_position_embeddings
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        # decode steps through Transformer.decode_step where it applies (None = decide from the model), and
        # single-row steps through a RowDecoder where that applies too
        self.lean = lean_decode_ok(model) if lean is None else lean
        # an int8 model's steps, any number of rows, through one C call where pakar._int8step was built
        self.int8_step = Int8Step(model) if self.lean and Int8Step.applies(model) else None
        self.row_decoder = (RowDecoder(model) if self.int8_step is None and self.lean and RowDecoder.applies(model)
                            else None)

    def check_prompt(self, prompt_ids: Sequence[int], what: str = "prompt") -> None:
        """Raise ContextLengthError (or PakarError for an empty/invalid prompt) if it cannot be run."""
        n, W = len(prompt_ids), self.context_window
        if n == 0:
            raise PakarError(f"{what} is empty: need at least one token")
        if n >= W:
            raise ContextLengthError(f"{what} has {n} tokens but the model's context window is {W} tokens "
                                     f"(at most {W - 1} prompt tokens leave room for an answer)")
        V = self.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= V:
            raise PakarError(f"{what} has token ids outside the vocabulary [0, {V})")

    def new_batch(self) -> "Batch":
        return Batch(self)

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[list[TokenEvent]]:
        """Prefill all prompts as one batch, then yield each step's events until every row finished.
        Row ids are the prompts' indices."""
        batch = self.new_batch()
        batch.add(prompts, params)
        while batch.active:
            yield batch.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[list[int]]:
        """The generated ids of each prompt, without a final stop token (use stream() for the
        finish reasons)."""
        out: list[list[int]] = [[] for _ in prompts]
        for events in self.stream(prompts, params):
            for ev in events:
                if ev.token is not None and ev.finish_reason != STOP:
                    out[ev.row].append(ev.token)
        return out


class Batch:
    """Rows decoded together. add() -> row ids; step() -> events; cancel(row); active (row count)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model = engine.model
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.capacity = 0  # allocated cache columns
        self.mask_BC: torch.Tensor | None = None  # valid (non-padding) columns
        self.logits_BV: torch.Tensor | None = None  # next-token logits per row, while not yet sampled
        self.last_B1: torch.Tensor | None = None  # sampled tokens not yet fed to the model
        self.seen_BV: torch.Tensor | None = None  # tokens seen per row (only when a row uses a penalty)
        self._next_id = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    def cancel(self, row_id: int) -> None:
        """The row ends at the next step() with reason "cancelled"; unknown or finished ids are ignored."""
        for r in self.rows:
            if r.id == row_id:
                r.cancelled = True

    def drop(self, row_ids: Sequence[int]) -> None:
        """Remove rows now, without an event (the caller already knows they are done)."""
        gone = set(row_ids)
        if any(r.id in gone for r in self.rows):
            self._keep([i for i, r in enumerate(self.rows) if r.id not in gone])

    # --- adding rows ------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[int]:
        """Prefill `prompts` and add them to the batch; returns their row ids (consecutive, from 0 for
        a new batch). Raises ContextLengthError / PakarError before doing any work if one is invalid."""
        eng = self.engine
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise PakarError(f"got {len(prompts)} prompts but {len(params)} sampling parameter sets")
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            eng.check_prompt(p, f"prompt {i}" if len(prompts) > 1 else "prompt")
        if self.last_B1 is not None:  # existing rows must have logits before the batch is merged
            self._feed()

        dev, W = eng.device, eng.context_window
        new_rows = []
        for p, sp in zip(prompts, params):
            gen = torch.Generator(device=dev)
            # any integer seed is valid; torch takes 64-bit seeds
            gen.manual_seed(sp.seed % 2**63 if sp.seed is not None else int(torch.randint(2**62, (1,)).item()))
            new_rows.append(_Row(self._next_id, sp, gen, len(p), min(len(p) + sp.max_new_tokens, W)))
            self._next_id += 1

        n, P = len(prompts), max(len(p) for p in prompts)
        pads = [P - len(p) for p in prompts]
        ids_BT = torch.tensor([[0] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long, device=dev)
        valid_BT = torch.tensor([[False] * pad + [True] * len(p) for pad, p in zip(pads, prompts)], device=dev)
        first = not self.rows
        # a fresh batch gets its decode room now; a joining group gets exactly its prompt, then merges
        cap = self._needed_capacity(P, new_rows) if first else P
        cache = KVCache(eng.config, n, cap, device=dev, dtype=eng.dtype)
        kw = {}
        if any(pads):
            kw = dict(attention_mask=valid_BT, position_ids=(valid_BT.long().cumsum(1) - 1).clamp_min(0))
        logits_BV = self.model(ids_BT, kv_cache=cache, last_only=True, **kw).logits[:, -1].float()
        mask_BC = torch.zeros(n, cap, dtype=torch.bool, device=dev)
        mask_BC[:, :P] = valid_BT

        seen_BV = None
        if any(sp.repetition_penalty != 1.0 for sp in params) or self.seen_BV is not None:
            seen_BV = torch.zeros(n, eng.config.vocab_size, dtype=torch.bool, device=dev)
            for i, p in enumerate(prompts):
                seen_BV[i, torch.tensor(list(p), dtype=torch.long, device=dev)] = True
        if first:
            self.cache, self.capacity, self.mask_BC = cache, cap, mask_BC
            self.logits_BV, self.seen_BV, self.rows = logits_BV, seen_BV, new_rows
        else:
            self._merge(cache, mask_BC, logits_BV, seen_BV, new_rows)
        return [r.id for r in new_rows]

    def _needed_capacity(self, filled: int, rows: Sequence[_Row]) -> int:
        # each row feeds (limit - length) more tokens; columns never exceed the context window
        return min(self.engine.context_window, filled + max(r.limit - r.length for r in rows))

    def _merge(self, cache: KVCache, mask_BC, logits_BV, seen_BV, new_rows):
        """Append a prefilled group to the running batch, aligning both on their last filled column."""
        S, P = self.cache.pos, cache.pos
        S2 = max(S, P)
        rows = self.rows + new_rows
        cap = max(self._needed_capacity(S2, rows), S2)
        L, B, G, _, K = self.cache.k.shape
        n = len(new_rows)
        k = torch.zeros(L, B + n, G, cap, K, dtype=self.cache.k.dtype, device=self.cache.k.device)
        v = torch.zeros_like(k)
        mask = torch.zeros(B + n, cap, dtype=torch.bool, device=k.device)
        k[:, :B, :, S2 - S:S2], v[:, :B, :, S2 - S:S2] = self.cache.k[:, :, :, :S], self.cache.v[:, :, :, :S]
        k[:, B:, :, S2 - P:S2], v[:, B:, :, S2 - P:S2] = cache.k[:, :, :, :P], cache.v[:, :, :, :P]
        mask[:B, S2 - S:S2], mask[B:, S2 - P:S2] = self.mask_BC[:, :S], mask_BC[:, :P]
        self.cache.k, self.cache.v, self.cache.max_len, self.cache.pos = k, v, cap, S2
        self.capacity, self.mask_BC, self.rows = cap, mask, rows
        self.logits_BV = torch.cat([self.logits_BV, logits_BV])
        if seen_BV is not None or self.seen_BV is not None:
            V = self.engine.config.vocab_size
            old = self.seen_BV if self.seen_BV is not None else torch.zeros(B, V, dtype=torch.bool, device=k.device)
            new = seen_BV if seen_BV is not None else torch.zeros(n, V, dtype=torch.bool, device=k.device)
            self.seen_BV = torch.cat([old, new])

    # --- decoding ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Sample one token for every active row; returns one event per row (finished rows leave)."""
        events = [TokenEvent(r.id, None, CANCELLED) for r in self.rows if r.cancelled]
        if events:
            self._keep([i for i, r in enumerate(self.rows) if not r.cancelled])
        if not self.rows:
            return events
        if self.last_B1 is not None:
            self._feed()
        params = [r.params for r in self.rows]
        tok_B = sample_tokens(self.logits_BV, params, [r.generator for r in self.rows], self.seen_BV)
        tokens = tok_B.tolist()  # the one host sync per step
        keep = []
        for i, (r, t) in enumerate(zip(self.rows, tokens)):
            if t < 0:  # this row's sampling failed: it ends alone, with reason "error"
                events.append(TokenEvent(r.id, None, ERROR))
                continue
            r.generated += 1
            reason = STOP if t in r.params.stop_token_ids else LENGTH if r.length >= r.limit else None
            events.append(TokenEvent(r.id, t, reason))
            if reason is None:
                keep.append(i)
        if self.seen_BV is not None:
            self.seen_BV[torch.arange(len(tokens), device=tok_B.device), tok_B] = True
        self.last_B1 = tok_B[:, None]
        self.logits_BV = None
        if len(keep) < len(self.rows):
            self._keep(keep)
        return events

    def _feed(self) -> None:
        """Run the sampled tokens through the model: next-token logits for every row."""
        cache = self.cache
        if cache.pos >= self.capacity:
            self._make_room()
        S = cache.pos
        self.mask_BC[:, S] = True
        lengths = [r.length for r in self.rows]
        if self.engine.int8_step is not None:
            _check_window(self.model, S + 1)
            padded = len(lengths) > 1 and any(n != S + 1 for n in lengths)
            pos_B = torch.tensor([n - 1 for n in lengths])
            self.logits_BV = self.engine.int8_step(self.last_B1.view(-1), pos_B, cache,
                                                   self.mask_BC if padded else None)
        elif len(lengths) == 1 and self.engine.row_decoder is not None:
            self.logits_BV = self.engine.row_decoder(int(self.last_B1), cache, lengths[0])
        else:
            mask_BS = pos_B1 = None
            if any(n != S + 1 for n in lengths):  # some row is left-padded: explicit mask and positions
                mask_BS = self.mask_BC[:, :S + 1]
                pos_B1 = torch.tensor(lengths, device=self.last_B1.device)[:, None] - 1
            if self.engine.lean:
                _check_window(self.model, S + 1)
                self.logits_BV = self.model.decode_step(self.last_B1, cache, pos_B1, mask_BS).float()
            else:
                out = self.model(self.last_B1, kv_cache=cache, last_only=True, position_ids=pos_B1,
                                 attention_mask=mask_BS)
                self.logits_BV = out.logits[:, -1].float()
        self.last_B1 = None

    def _make_room(self) -> None:
        """The shared columns are full: grow the cache up to the context window, or drop the columns
        that are padding for every active row (one exists: a row filling the window has finished)."""
        cache, S = self.cache, self.cache.pos
        if self.capacity < self.engine.context_window:
            cap = max(self._needed_capacity(S, self.rows), S + 1)
            pad = cap - self.capacity
            cache.k = torch.nn.functional.pad(cache.k, (0, 0, 0, pad))
            cache.v = torch.nn.functional.pad(cache.v, (0, 0, 0, pad))
            self.mask_BC = torch.nn.functional.pad(self.mask_BC, (0, pad))
            self.capacity = cache.max_len = cap
            return
        drop = S + 1 - max(r.length for r in self.rows)  # +1: lengths already count the token to feed
        assert drop > 0, "a row at the context window should have finished"
        cache.k[:, :, :, :S - drop] = cache.k[:, :, :, drop:S].clone()
        cache.v[:, :, :, :S - drop] = cache.v[:, :, :, drop:S].clone()
        self.mask_BC[:, :S - drop] = self.mask_BC[:, drop:S].clone()
        self.mask_BC[:, S - drop:] = False
        cache.pos = S - drop

    def _keep(self, keep: list[int]) -> None:
        """Compact the batch to the rows at indices `keep`."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask_BC = self.logits_BV = self.last_B1 = self.seen_BV = None
            self.capacity = 0
            return
        idx = torch.tensor(keep, device=self.mask_BC.device)
        self.cache.k = self.cache.k.index_select(1, idx)
        self.cache.v = self.cache.v.index_select(1, idx)
        self.mask_BC = self.mask_BC.index_select(0, idx)
        for name in ("logits_BV", "last_B1", "seen_BV"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
