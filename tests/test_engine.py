"""The generation engine against independent references: repeated full forwards of the model (greedy),
one-by-one runs (batching, joining a running batch, cancellation, the context window), Hugging Face's
logits processors (repetition penalty, temperature, top-k, top-p), and exact replay (seeds)."""

from __future__ import annotations

import pytest
import torch

from pakar import PakarError
from pakar.config import get_config
from pakar.engine import (CANCELLED, ERROR, LENGTH, STOP, ContextLengthError, Engine, SamplingParams,
                          process_logits, sample_tokens)
from pakar.model import Transformer

V, W = 300, 64  # vocabulary and context window of the test model


def make_model(k: int = 2, window: int = W, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = get_config("tiny", vocab_size=V, max_position_embeddings=window, num_experts_per_tok=k,
                     norm_topk_prob=k > 1)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_forward_greedy(model, prompt, n_new, window=W):
    """The literal reference: no cache, the whole sequence through the model for every new token. Also
    returns, per step, the gap between the best and second-best logit (to recognise near-ties)."""
    ids, out, gaps = list(prompt), [], []
    for _ in range(n_new):
        if len(ids) >= window:
            break
        logits = model(torch.tensor([ids])).logits[0, -1]
        top2 = logits.topk(2).values
        gaps.append((top2[0] - top2[1]).item())
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, gaps


def assert_same_greedy(got, ref, gaps, what=""):
    """Equal tokens; a first difference is accepted only at a numerical near-tie (top-2 gap < 1e-5),
    where a cached and an uncached float32 forward may legitimately disagree."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < 1e-5, f"{what}: token {i} differs ({a} vs {b}) with a top-2 gap of {gaps[i]:.2e}"
            return
    assert len(got) == len(ref), f"{what}: {len(got)} tokens vs {len(ref)}"


@torch.no_grad()
def assert_is_greedy(model, prompt, got, n_expected, what=""):
    """`got` is what repeated uncached full forwards would produce: one uncached forward over
    prompt + got must put its argmax on every generated token (then, by induction over the prefixes,
    the token-by-token loop yields the same sequence). A token that is not the argmax is accepted only
    at a near-tie, and then the rest is not compared (the sequences may part there)."""
    assert len(got) == n_expected, f"{what}: {len(got)} tokens, expected {n_expected}"
    logits = model(torch.tensor([list(prompt) + list(got)])).logits[0, len(prompt) - 1:-1]
    for i, t in enumerate(got):
        best = logits[i].max()
        if logits[i].argmax() != t:
            assert best - logits[i][t] < 1e-5, f"{what}: token {i} is not the argmax (gap {best - logits[i][t]:.2e})"
            return


GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("lean", [True, False])
def test_cached_greedy_equals_full_forwards(k, lean):
    model = make_model(k)
    engine = Engine(model, lean=lean)
    for p in prompts_of([1, 30]):
        got = engine.generate([p], GREEDY)[0]
        ref, gaps = full_forward_greedy(model, p, GREEDY.max_new_tokens)
        assert_same_greedy(got, ref, gaps, f"k={k} lean={lean} prompt of {len(p)}")


def test_decode_step_matches_model_forward(model):
    """The engine's batched CPU decode step computes the model's own logits, with and without padding."""
    from pakar.model import KVCache

    ids = torch.tensor(prompts_of([12, 12]))
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        caches = [KVCache(model.config, 2, 20), KVCache(model.config, 2, 20)]
        for c in caches:
            model(ids, kv_cache=c, attention_mask=valid[:, :12], position_ids=pos[:, :12])
        nxt = torch.tensor([[5], [9]])
        ref = model(nxt, kv_cache=caches[0], attention_mask=valid, position_ids=pos[:, 12:]).logits[:, -1]
        got = model.decode_step(nxt, caches[1], pos[:, 12:], valid)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert caches[0].pos == caches[1].pos == 13


def test_batched_generation_equals_one_by_one(model):
    engine = Engine(model)
    prompts = prompts_of([5, 17, 1, 30, 9])
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (20, 3, 25, 10, 1)]
    batched = engine.generate(prompts, params)
    for p, sp, got in zip(prompts, params, batched):
        assert got == engine.generate([p], sp)[0]
        assert_is_greedy(model, p, got, sp.max_new_tokens, f"prompt of {len(p)}")


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    engine = Engine(model)
    prompts = prompts_of([4, 11, 20, 2])
    params = [SamplingParams(max_new_tokens=15, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3,
                             seed=100 + i) for i in range(4)]
    together = engine.generate(prompts, params)
    reversed_ = engine.generate(prompts[::-1], params[::-1])[::-1]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert together == reversed_ == alone
    other_seed = engine.generate(prompts[:1], [SamplingParams(**{**params[0].__dict__, "seed": 7})])[0]
    assert other_seed != together[0]  # the seed matters (15 tokens from ~40 candidates)
    # unseeded rows draw their seeds from torch's global RNG: reproducible under torch.manual_seed
    unseeded = SamplingParams(max_new_tokens=15, temperature=1.0)
    torch.manual_seed(3)
    a = engine.generate(prompts, unseeded)
    torch.manual_seed(3)
    assert engine.generate(prompts, unseeded) == a


def test_processors_match_hugging_face():
    """Repetition penalty, temperature, top-k and top-p leave exactly the tokens (and, where not
    filtered, the logits) that transformers' logits processors leave."""
    pytest.importorskip("transformers")
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    B = 6
    logits = torch.randn(B, V, generator=g) * 3
    history = torch.randint(0, V, (B, 12), generator=g)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, history, True)
    cases = [(1.0, 0, 1.0, 1.0), (0.7, 10, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.5, 50, 0.9, 1.2), (1.0, 0, 1.0, 1.5),
             (2.0, 5, 0.3, 0.8)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r) for t, k, p, r in cases]
    got = process_logits(logits, params, seen)
    for i, (t, k, p, r) in enumerate(cases):
        x = logits[i:i + 1].clone()
        ids = history[i:i + 1]
        if r != 1.0:
            x = RepetitionPenaltyLogitsProcessor(r)(ids, x)
        x = TemperatureLogitsWarper(t)(ids, x)
        if k:
            x = TopKLogitsWarper(k)(ids, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(ids, x)
        kept = torch.isfinite(x[0])
        assert torch.equal(torch.isfinite(got[i]), kept), f"case {cases[i]}: different tokens kept"
        torch.testing.assert_close(got[i][kept], x[0][kept])


def test_sampling_follows_the_distribution():
    """Draws from one row match softmax(logits / T) (chi-square-style bound), top-k never leaves
    the k best, and temperature 0 is the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    sp = SamplingParams(temperature=0.8, seed=1)
    gen = torch.Generator().manual_seed(1)
    n = 4000
    draws = torch.cat([sample_tokens(logits, [sp], [gen]) for _ in range(n)])
    freq = torch.bincount(draws, minlength=6).double() / n
    expected = (logits[0] / 0.8).softmax(-1).double()
    assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max()
    top2 = SamplingParams(temperature=5.0, top_k=2)
    assert set(torch.cat([sample_tokens(logits, [top2], [gen]) for _ in range(200)]).tolist()) == {0, 1}
    assert sample_tokens(logits, [SamplingParams(temperature=0.0)], [gen]).item() == 0


def test_stop_tokens_and_finish_reasons(model):
    engine = Engine(model)
    p = prompts_of([6])[0]
    free = engine.generate([p], GREEDY)[0]
    stop = free[5]  # a token the model will produce
    first = free.index(stop)
    events = [ev for step in engine.stream([p], SamplingParams(max_new_tokens=24, temperature=0.0,
                                                               stop_token_ids=(stop,))) for ev in step]
    assert [ev.token for ev in events] == free[:first + 1]
    assert events[-1].finish_reason == STOP and all(ev.finish_reason is None for ev in events[:-1])
    assert engine.generate([p], SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(stop,)))[0] \
        == free[:first]  # generate() leaves the stop token out
    events = [ev for step in engine.stream([p], SamplingParams(max_new_tokens=3, temperature=0.0)) for ev in step]
    assert len(events) == 3 and events[-1].finish_reason == LENGTH


def test_context_window_policy(model):
    engine = Engine(model)
    with pytest.raises(ContextLengthError, match=f"{W} tokens but the model's context window is {W}"):
        engine.generate(prompts_of([W]), GREEDY)
    with pytest.raises(ContextLengthError, match="prompt 1 has 70 tokens"):
        engine.generate(prompts_of([3, 70]), GREEDY)
    with pytest.raises(PakarError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(PakarError, match="outside the vocabulary"):
        engine.generate([[V]], GREEDY)
    # a prompt of W-1 tokens gets exactly one token; max_new_tokens is capped at the window
    p = prompts_of([W - 1])[0]
    events = [ev for s in engine.stream([p], SamplingParams(max_new_tokens=50, temperature=0.0)) for ev in s]
    assert len(events) == 1 and events[0].finish_reason == LENGTH
    # rows of very different lengths that all run into the window: the shared cache must drop common
    # padding columns on the way, and every row must still equal its own uncached run
    prompts = prompts_of([50, 2, 30, 61])
    big = SamplingParams(max_new_tokens=1000, temperature=0.0)
    for p, got in zip(prompts, engine.generate(prompts, big)):
        assert got == engine.generate([p], big)[0]
        assert_is_greedy(model, p, got, W - len(p), f"prompt of {len(p)} at the window")


def test_rows_joining_a_running_batch(model):
    """Continuous batching: rows added mid-flight (longer and shorter than the running rows) produce
    what they produce alone, and do not disturb the rows already running."""
    engine = Engine(model)
    a, b, c = prompts_of([8, 25, 3])
    batch = engine.new_batch()
    assert batch.add([a], GREEDY) == [0]
    out: dict[int, list[int]] = {0: []}
    step = 0
    while batch.active:
        if step == 4:
            assert batch.add([b, c], [GREEDY, SamplingParams(max_new_tokens=30, temperature=0.0)]) == [1, 2]
            out[1], out[2] = [], []
        for ev in batch.step():
            out[ev.row].append(ev.token)
        step += 1
    for row, (p, sp) in {0: (a, GREEDY), 1: (b, GREEDY), 2: (c, SamplingParams(max_new_tokens=30, temperature=0.0))}.items():
        assert out[row] == engine.generate([p], sp)[0], f"row {row}"
        assert_is_greedy(model, p, out[row], sp.max_new_tokens, f"row {row}")


def test_cancel_removes_only_that_row(model):
    engine = Engine(model)
    prompts = prompts_of([5, 9, 14])
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    batch = engine.new_batch()
    batch.add(prompts, GREEDY)
    out = {0: [], 1: [], 2: []}
    reasons = {}
    for i in range(30):
        if i == 3:
            batch.cancel(1)
        if not batch.active:
            break
        for ev in batch.step():
            if ev.token is not None:
                out[ev.row].append(ev.token)
            if ev.finish_reason:
                reasons[ev.row] = ev.finish_reason
    assert reasons == {0: LENGTH, 1: CANCELLED, 2: LENGTH}
    assert out[1] == alone[1][:3]
    assert out[0] == alone[0] and out[2] == alone[2]


def test_a_row_whose_sampling_fails_ends_alone(model):
    """temperature 1e-300 is 0 in float32: that row's distribution is NaN. It ends with "error" and no
    token; the seeded and greedy rows beside it sample exactly what they sample alone."""
    engine = Engine(model)
    prompts = prompts_of([5, 9, 14])
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5),
              SamplingParams(max_new_tokens=12, temperature=1e-300, seed=6),
              SamplingParams(max_new_tokens=12, temperature=0)]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    batch = engine.new_batch()
    batch.add(prompts, params)
    out, reasons = {0: [], 1: [], 2: []}, {}
    while batch.active:
        for ev in batch.step():
            if ev.token is not None:
                out[ev.row].append(ev.token)
            if ev.finish_reason:
                reasons[ev.row] = ev.finish_reason
    assert reasons == {0: LENGTH, 1: ERROR, 2: LENGTH}
    assert out[1] == [] and out[0] == alone[0] and out[2] == alone[2]


@pytest.mark.parametrize("k,norm,tied,bias", [(1, False, False, False), (2, True, False, False),
                                               (2, False, True, False), (2, False, False, True)])
def test_row_decoder_matches_model_forward(k, norm, tied, bias):
    """The single-row decode step computes the model's own logits over a run of steps: top-1 and
    top-2 routing, renormalised gates, tied embeddings, a non-zero expert-selection bias, and a row
    whose cache starts with left padding (what a batch leaves behind when its other rows finish)."""
    from pakar.engine import RowDecoder
    from pakar.model import KVCache

    torch.manual_seed(3)
    cfg = get_config("tiny", vocab_size=V, max_position_embeddings=W, num_experts_per_tok=k,
                     norm_topk_prob=norm, tie_word_embeddings=tied)
    model = Transformer(cfg).eval()
    if bias:
        for layer in model.layers:
            layer.mlp.gate.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.1)
    assert RowDecoder.applies(model)
    decoder = RowDecoder(model)
    prompt = prompts_of([9], seed=4)[0]
    for pad in (0, 5):
        valid = torch.tensor([[False] * pad + [True] * len(prompt)])
        ids = torch.tensor([[0] * pad + prompt])
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            ref_cache, row_cache = KVCache(cfg, 1, 20), KVCache(cfg, 1, 20)
            for c in (ref_cache, row_cache):
                model(ids, kv_cache=c, attention_mask=valid, position_ids=pos)
            for step, tok in enumerate([5, 9, 200, 17]):
                valid = torch.cat([valid, torch.ones(1, 1, dtype=torch.bool)], 1)
                n = len(prompt) + step + 1
                ref = model(torch.tensor([[tok]]), kv_cache=ref_cache, attention_mask=valid,
                            position_ids=torch.tensor([[n - 1]])).logits[:, -1]
                got = decoder(tok, row_cache, n)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                assert row_cache.pos == ref_cache.pos
        torch.testing.assert_close(row_cache.k, ref_cache.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row_cache.v, ref_cache.v, rtol=1e-5, atol=1e-6)


def test_row_decoder_applies_only_to_stock_float32_models(model):
    from pakar.engine import RowDecoder
    from pakar.lora import LoraSpec, apply_lora

    assert RowDecoder.applies(model) and Engine(model).row_decoder is not None
    assert Engine(model, lean=False).row_decoder is None
    assert not RowDecoder.applies(make_model().to(torch.bfloat16))
    wrapped = apply_lora(make_model(), LoraSpec(rank=2, alpha=4.0, targets=("q_proj",))).eval()
    with torch.no_grad():  # non-zero adapters, so that ignoring them would change the tokens
        for name, prm in wrapped.named_parameters():
            if prm.requires_grad:
                prm.normal_(0, 0.5)
    assert not RowDecoder.applies(wrapped)
    # a LoRA-wrapped model decodes through Transformer.decode_step, still equal to full forwards
    p = prompts_of([7])[0]
    ref, gaps = full_forward_greedy(wrapped, p, 8)
    assert_same_greedy(Engine(wrapped).generate([p], SamplingParams(max_new_tokens=8, temperature=0.0))[0],
                       ref, gaps, "LoRA-wrapped")


def test_sampling_params_are_validated():
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
                       (dict(seed="x"), "seed")]:
        with pytest.raises(PakarError, match=field):
            SamplingParams(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda(dtype):
    """On a GPU (the model's own forward, no CPU shortcut): cached greedy is the uncached greedy,
    batching changes nothing beyond near-ties, and seeded sampling replays exactly."""
    model = make_model().to("cuda", dtype)
    engine = Engine(model)
    assert not engine.lean
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bfloat16 logits carry ~3 significant digits
    prompts = prompts_of([5, 17, 1, 30])
    batched = engine.generate(prompts, GREEDY)
    for p, got in zip(prompts, batched):
        alone = engine.generate([p], GREEDY)[0]
        with torch.no_grad():
            logits = model(torch.tensor([p + got], device="cuda")).logits[0, len(p) - 1:-1].float()
        for i, t in enumerate(got):
            assert logits[i].max() - logits[i][t] <= tol, f"token {i} of a {len(p)}-token prompt is not greedy"
        for i, (a, b) in enumerate(zip(got, alone)):
            if a != b:  # batched and alone may part only where the two candidates are (nearly) tied
                assert abs(logits[i][a] - logits[i][b]) <= tol
                break
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=i) for i in range(4)]
    assert engine.generate(prompts, params) == engine.generate(prompts, params)
