"""Front-end detokenisation cost per streamed token, by output length: the Detokenizer's decode
window against decoding the whole output at every token (what it did before), on one tokenizer.

    python scripts/bench_detokenizer.py --tokenizer runs/smollm2 [--lengths 64 512 2048 8192]

Prints, per length, the median over --runs of the mean µs per token for both, and their ratio.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.detokenizer import Detokenizer  # noqa: E402


def per_token_us(add, ids: list[int]) -> float:
    t0 = time.perf_counter()
    for i, t in enumerate(ids):
        add(i, t)
    return (time.perf_counter() - t0) / len(ids) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (a converted model's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048, 8192])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(0)
    print(f"{'tokens':>7} {'window µs/token':>16} {'whole µs/token':>15} {'ratio':>6}")
    for n in args.lengths:
        ids = [rng.randrange(len(tok)) for _ in range(n)]
        window, whole = [], []
        for _ in range(args.runs):
            d = Detokenizer(tok, ["</answer>"])
            window.append(per_token_us(lambda i, t: d.add([t], i == n - 1), ids))
            whole.append(per_token_us(lambda i, t: tok.decode(ids[:i + 1], skip_special_tokens=True), ids))
        a, b = statistics.median(window), statistics.median(whole)
        print(f"{n:>7} {a:>16.1f} {b:>15.1f} {b / a:>5.0f}×")


if __name__ == "__main__":
    main()
