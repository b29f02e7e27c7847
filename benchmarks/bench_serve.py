"""Throughput of `pakar serve` under concurrent clients: continuous batching vs one request at a time.

Two servers on the same model in the same run (loopback, real HTTP, the official `openai` client
streaming): one with --max-batch N (the default way pakar serves), one with --max-batch 1 (the
reference: requests served one after another). The same N clients send the same seeded requests to
each; the script reports generated tokens per second (from the servers' usage counts), time to first
token and request latency, and the speed-up of batching. The last line is one JSON object.

The model is a randomly initialised preset (its speed does not depend on its weights) with a
tokenizer trained on real Indonesian text (../shared/data/id_general, or the embedded sample corpus
when that folder is absent); prompts are sentences from the same text.

    python benchmarks/bench_serve.py --config small --clients 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / ".." / "shared" / "data" / "id_general" / "wiki_paragraphs.txt"


def build_checkpoint(config: str, vocab: int, out: Path) -> tuple[Path, list[str]]:
    from pakar.checkpoint import save_model
    from pakar.config import get_config
    from pakar.corpus import embedded_sample_path, iter_documents
    from pakar.model import Transformer
    from pakar.tokenizer import train_tokenizer

    source = DATA if DATA.exists() else embedded_sample_path()
    docs = list(iter_documents([str(source)]))[:3000]
    tok = train_tokenizer(docs, vocab)
    cfg = get_config(config, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    path = out / f"bench_{config}.pt"
    save_model(path, model.state_dict(), cfg, tok.to_json())
    prompts = [" ".join(d.split()[:24]) for d in docs if len(d.split()) >= 24]
    return path, prompts


def run_clients(server, prompts: list[str], max_tokens: int) -> dict:
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i: int):
        c = server.client()
        barrier.wait()
        t0 = time.perf_counter()
        first, tokens = None, 0
        stream = c.completions.create(model=server.model_name, prompt=prompts[i], max_tokens=max_tokens,
                                      temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        results[i] = (first or 0.0, time.perf_counter() - t0, tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_median_s": round(statistics.median(r[0] for r in results), 3),
            "latency_median_s": round(statistics.median(r[1] for r in results), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="model preset (default: small)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size (default: 4096)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = p.parse_args()

    from test_serve import LiveServer  # the test suite's in-process uvicorn on a loopback socket

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, sentences = build_checkpoint(args.config, args.vocab_size, Path(tmp))
        prompts = [sentences[i % len(sentences)] for i in range(args.clients)]
        out = {"config": args.config, "clients": args.clients, "max_tokens": args.max_tokens,
               "device": args.device, "torch_threads": torch.get_num_threads()}
        for name, max_batch in (("batched", args.clients), ("one_at_a_time", 1)):
            server = LiveServer(ckpt, max_batch=max_batch, device=args.device)
            try:
                run_clients(server, prompts[:2], 4)  # warm up
                out[name] = run_clients(server, prompts, args.max_tokens)
                out[name]["peak_batch"] = server.health()["peak_batch"]
            finally:
                server.close()
            print(f"{name}: {out[name]}", flush=True)
        out["speedup_tokens_per_s"] = round(out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
