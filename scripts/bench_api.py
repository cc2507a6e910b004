"""What the front ends cost: the same requests through gRPC (RempClient) and the OpenAI HTTP API
(the official `openai` client), side by side against one server, alternating per request.

For each API: latency of a 1-token request (admission + one prefill step + transport), and of a
streamed N-token request (time to first token, time per output token after it). Medians over
--runs requests each; the engine step is the physical floor both share.

    python scripts/bench_api.py --model runs/smollm2 --runs 20 --tokens 32
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402

PROMPT = "The capital of France is"


def timed_stream(chunks) -> tuple[float, float, int]:
    """(seconds to the first chunk with text, seconds per chunk after it, chunks)."""
    t0, times = time.perf_counter(), []
    for _ in chunks:
        times.append(time.perf_counter())
    return times[0] - t0, (times[-1] - times[0]) / max(len(times) - 1, 1), len(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    import openai

    with (tempfile.TemporaryDirectory() as tmp,
          ServerProcess(args.model, 1, 1, 1, "--http-port", "0", workdir=tmp,
                        env={"OMP_NUM_THREADS": "1"}) as server):
        grpc_c = RempClient(server.addr)
        oai = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
        model = oai.models.list().data[0].id
        rows: dict[str, dict[str, list[float]]] = {"gRPC": {}, "HTTP (openai client)": {}}

        def one_token(api: str) -> float:
            t0 = time.perf_counter()
            if api == "gRPC":
                grpc_c.generate(PROMPT, max_new_tokens=1)
            else:
                oai.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0)
            return time.perf_counter() - t0

        def streamed(api: str):
            n = args.tokens
            if api == "gRPC":
                return timed_stream(grpc_c.stream(PROMPT, max_new_tokens=n, ignore_eos=True))
            return timed_stream(c for c in oai.completions.create(
                model=model, prompt=PROMPT, max_tokens=n, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) if c.choices and c.choices[0].text)

        for api in rows:  # warm-up
            one_token(api), streamed(api)
        for _ in range(args.runs):
            for api, r in rows.items():
                r.setdefault("1-token request ms", []).append(one_token(api) * 1e3)
                ttft, tpot, _ = streamed(api)
                r.setdefault("stream TTFT ms", []).append(ttft * 1e3)
                r.setdefault("stream TPOT ms", []).append(tpot * 1e3)
        grpc_c.close()
    cols = list(next(iter(rows.values())))
    print(f"SmolLM2 at TP1·PP1, {args.runs} requests per cell (median), {args.tokens}-token streams\n")
    print("| API | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for api, r in rows.items():
        print(f"| {api} | " + " | ".join(f"{statistics.median(r[c]):.1f}" for c in cols) + " |")
    g, h = rows["gRPC"], rows["HTTP (openai client)"]
    print("\nHTTP ÷ gRPC: " + ", ".join(f"{c} {statistics.median(h[c]) / statistics.median(g[c]):.2f}×" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
