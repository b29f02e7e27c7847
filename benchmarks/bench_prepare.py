"""Benchmark `pakar prepare` against the bare `tokenizers` batch encoder, in the same run.

    python benchmarks/bench_prepare.py [--data FILE] [--vocab-size 8192] [--repeat 1]

1. Trains the tokenizer once (or loads --tokenizer) into a temporary run folder, so prepare only
   tokenizes; the benchmark's text is read into memory for the bare encoder (not timed).
2. prepare: `pakar prepare` in a child process, cache cold: wall time of the whole command
   (interpreter start, imports, hashing the sources, reading, tokenizing, writing) and its peak RSS
   (the child's VmHWM on Linux).
3. bare encoder: the same documents, decompressed into memory beforehand, encoded by
   the same tokenizer with `tokenizers.Tokenizer.encode_batch_fast` on all cores, ids extracted
   to count tokens: once as one call over the whole corpus, once in the 4 MB chunks prepare uses.
   The faster of the two is the baseline.
The ratio is bare time / prepare wall time for the same tokens (prepare's extra <|endoftext|> per
document is not counted as work). The last line is one JSON object. Other processes on the machine
make the numbers noisy: compare the ratio, not absolute times; --repeat interleaves several rounds
and keeps the best of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "id_legal" / "train.txt.gz"
# runs `pakar prepare` and prints its peak RSS in KiB: VmHWM on Linux (ru_maxrss would include this
# parent's own peak, which Linux carries into children), ru_maxrss elsewhere
PREPARE_CHILD = """
import resource, sys
from pakar.cli import main
rc = main(sys.argv[1:])
try:
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
print(peak)
sys.exit(rc)
"""


def bare_encode(tokenizer, chunks: list[list[str]]) -> tuple[float, int]:
    """Seconds and tokens to encode lists of documents with the raw `tokenizers` batch encoder."""
    t0 = time.perf_counter()
    n = 0
    for chunk in chunks:
        n += sum(len(e.ids) for e in tokenizer.hf.encode_batch_fast(chunk, add_special_tokens=False))
    return time.perf_counter() - t0, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="corpus file (default: id_legal train.txt.gz)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size (default 8192)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all measurements; best is kept (default 1)")
    parser.add_argument("--tokenizer", help="an existing tokenizer.json to use instead of training one")
    args = parser.parse_args()
    data = Path(args.data).resolve()
    if not data.exists():
        print(f"error: {data} not found (pass --data)", file=sys.stderr)
        return 2

    from pakar.corpus import iter_documents
    from pakar.data import document_chunks
    from pakar.tokenizer import Tokenizer, train_on_corpus

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        if args.tokenizer:
            tokenizer = Tokenizer.load(args.tokenizer)
        else:
            tokenizer, _, _ = train_on_corpus([str(data)], args.vocab_size, log=lambda *a: None)
        tokenizer.save(run / "tokenizer.json")
        train_s = time.perf_counter() - t0
        docs = list(iter_documents([str(data)]))  # the documents prepare reads, in memory
        chunks = [pieces for pieces, _, _ in document_chunks(iter(docs))]  # prepare's chunks of ~4 MB

        prepare_s, peak_kib, whole, chunked = [], 0, [], []
        for _ in range(args.repeat):  # interleaved, so a burst of load from elsewhere hits both sides
            for old in (run / "data").glob("*/*"):
                old.unlink()  # cold cache each time
            command = [sys.executable, "-c", PREPARE_CHILD, "prepare", "--data", str(data), "--out", str(run)]
            t0 = time.perf_counter()
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            prepare_s.append(time.perf_counter() - t0)
            peak_kib = max(peak_kib, int(out.split()[-1]))
            whole.append(bare_encode(tokenizer, [docs]))
            chunked.append(bare_encode(tokenizer, chunks))
        manifest = json.loads(next((run / "data").glob("*/manifest.json")).read_text())
        tokens = manifest["train"]["tokens"] + manifest["val"]["tokens"]
        documents = manifest["train"]["documents"] + manifest["val"]["documents"]
        bare_s, bare_tokens = min(whole + chunked)

    # prepare's tokens include one <|endoftext|> per document; the bare encoder's do not
    result = {
        "corpus": str(data), "documents": documents, "text_mb": round(sum(map(len, docs)) / 1e6, 1),
        "cores": os.cpu_count(), "tokenizer_train_s": round(train_s, 2),
        "prepare_wall_s": round(min(prepare_s), 2), "prepare_tokenize_s": manifest["tokenize_seconds"],
        "prepare_tokens": tokens, "prepare_tokens_per_s": round(tokens / min(prepare_s)),
        "prepare_peak_rss_mb": round(peak_kib / 1024), "bare_whole_s": round(min(whole)[0], 2),
        "bare_chunked_s": round(min(chunked)[0], 2), "bare_tokens": bare_tokens,
        "bare_tokens_per_s": round(bare_tokens / bare_s), "same_tokens": bare_tokens == tokens - documents,
        "ratio_prepare_vs_bare": round(bare_s / min(prepare_s), 3),
    }
    print(f"prepare: {result['prepare_wall_s']} s wall, {result['prepare_tokens_per_s'] / 1e6:.2f}M tokens/s, "
          f"peak RSS {result['prepare_peak_rss_mb']} MB")
    print(f"bare encoder: {bare_s:.2f} s, {result['bare_tokens_per_s'] / 1e6:.2f}M tokens/s "
          f"(whole corpus {result['bare_whole_s']} s, 4 MB chunks {result['bare_chunked_s']} s)")
    print(f"prepare / bare throughput: {result['ratio_prepare_vs_bare']:.2f} "
          "(target >= 0.80; a shared machine makes this noisy)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
