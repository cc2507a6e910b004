"""The main job (`make demo`): serve SmolLM2 on 3 CPU ranks and switch topology live.

Starts `remp serve` at TP3·PP1, streams several chat prompts, and while they stream switches
to TP1·PP3, to TP1·PP1 (two ranks standby) and back to TP3·PP1, printing each switch's downtime
and phases. Then runs the same prompts without switching and checks the answers are equal,
asks one of them again through the OpenAI HTTP API with the official `openai` client (same
answer expected), and shuts the server down with SIGTERM.

    python scripts/demo.py --model runs/smollm2
"""
import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from textwrap import shorten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.api import pb  # noqa: E402
from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Name three colors of the rainbow.",
    "What is 2 plus 2?",
    "Give one tip for staying healthy.",
]
SWITCHES = [(1, 3), (1, 1), (3, 1)]


def stream_all(client: RempClient, max_new: int, log: bool) -> list[str]:
    answers = [""] * len(PROMPTS)

    def run(i: int) -> None:
        for chunk in client.stream([{"role": "user", "content": PROMPTS[i]}], max_new_tokens=max_new):
            answers[i] += chunk.text
            if chunk.finished and log:
                print(f"  [stream {i} done: {chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]", flush=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    return answers, threads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    print("starting `remp serve` with SmolLM2-135M on 3 CPU ranks at TP3·PP1 ...", flush=True)
    with (tempfile.TemporaryDirectory() as tmp,
          ServerProcess(args.model, 3, 3, 1, "--http-port", "0", workdir=tmp) as server):
        client = RempClient(server.addr)
        print(f"serving gRPC on {server.addr} ({client.health()}), OpenAI HTTP API on {server.http_url}/v1\n")

        print(f"streaming {len(PROMPTS)} chat prompts, switching topology while they run:")
        answers, threads = stream_all(client, args.max_new_tokens, log=True)
        while client.status().running_requests < len(PROMPTS):
            time.sleep(0.05)
        for tp, pp in SWITCHES:
            time.sleep(0.5)
            phases = []
            for ev in client.reconfigure(tp, pp):
                kind = pb.ReconfigureEvent.Kind.Name(ev.kind)
                if kind == "PHASE":
                    phases.append(f"{ev.phase} {ev.seconds * 1e3:.0f} ms"
                                  + (f" ({ev.bytes / 2**20:.1f} MiB)" if ev.bytes else ""))
                elif kind == "STAGING":  # progress while serving goes on: the committed line sums it up
                    continue
                elif kind == "ACCEPTED":
                    st = client.status()
                    print(f"  switch {ev.source} -> {ev.target} with {st.running_requests} requests mid-stream")
                else:
                    st = client.status()
                    print("    phases: " + ", ".join(phases))
                    staged = f", staged {ev.staging_s * 1e3:.0f} ms while serving" if ev.prestaged else ""
                    print(f"    {kind.lower()}: downtime {ev.downtime_s * 1e3:.0f} ms (pause -> first token){staged}"
                          + (f", {ev.reason}" if ev.reason else "")
                          + f"; active ranks {list(st.active_ranks)}, standby {list(st.standby_ranks)}", flush=True)
        for t in threads:
            t.join()

        print("\nsame prompts again without switching; answers (with switches):")
        reference, threads = stream_all(client, args.max_new_tokens, log=False)
        for t in threads:
            t.join()
        same = answers == reference
        for q, a, r in zip(PROMPTS, answers, reference):
            print(f"  {q:<35s} {shorten(a, 64)!r}" + ("" if a == r else f"\n  {'reference:':<35s} {shorten(r, 64)!r}"))
        print(f"\nanswers with live switches == answers without: {same}")

        import openai

        oai = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused")
        model = oai.models.list().data[0].id
        chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=args.max_new_tokens, temperature=0)
        http_same = chat.choices[0].message.content == reference[0]
        print(f"openai client -> POST {server.http_url}/v1/chat/completions (model {model!r}): "
              f"{shorten(chat.choices[0].message.content, 64)!r}\n  usage {chat.usage.prompt_tokens} prompt + "
              f"{chat.usage.completion_tokens} completion tokens; same as over gRPC: {http_same}")
        history = client.status().switch_history
        print("switch history:", ", ".join(f"{s.source}->{s.target} {s.downtime_s * 1e3:.0f} ms" for s in history))
        client.close()
        code = server.stop(timeout=120)
        print(f"server shut down on SIGTERM, exit code {code}")
        return 0 if same and http_same and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
