"""The gRPC server over real loopback gRPC: a world of 4 ranks serving a tiny Llama while it
switches topology; error statuses; disconnects; the CLI; metrics."""
import json
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import torch

from conftest import Server
from remp_megatron.policy import CostProfile, TopologyCost
from remp_megatron.topology import Topology
from server.api import pb
from server.client import RempClient

pytestmark = pytest.mark.world

N_STREAMS = 30
MAX_NEW = 24


def test_proto_stubs_are_current():
    from server.protogen import PROTO_ROOT, generated_now

    fresh = generated_now()
    assert sorted(fresh) == ["remp_pb2.py", "remp_pb2_grpc.py"]
    for name, text in fresh.items():
        assert (PROTO_ROOT / "remp" / "v1" / name).read_text() == text, f"{name} is stale: run `make proto`"


@pytest.fixture(scope="module")
def server(llama_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    # A made-up cost profile: 2x2 is "latency-optimal", 1x4 "throughput-optimal".
    CostProfile((TopologyCost(Topology(2, 2), 0.01, 10.0), TopologyCost(Topology(1, 4), 0.02, 50.0))).save(
        tmp / "profile.json")
    s = Server(tmp, llama_mg, 4, 2, 2, "--allow-fault-injection", "--max-queue", "64",
               "--max-new-tokens", "256", "--max-prompt-tokens", "128", "--metrics-port", "0",
               "--policy-profile", str(tmp / "profile.json"), "--policy-interval", "0.2", "--policy-low", "0",
               "--policy-high", "4", "--policy-patience", "2", "--policy-min-dwell", "0")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with RempClient(server.addr) as c:
        yield c


@pytest.fixture(scope="module")
def scrape(server):
    """Reads the server's Prometheus metrics: {"name{labels}": value}."""
    port = None
    for line in server.log_path.read_text().splitlines():
        if "metrics on" in line:
            port = int(line.rsplit(":", 1)[1])
    assert port, "server did not log its metrics port"

    def read() -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {name: float(value) for name, _, value in
                (line.rpartition(" ") for line in body.splitlines() if line and not line.startswith("#"))}

    return read


def prompts(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def reference(llama_hf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):].tolist()
            for p in prompts(N_STREAMS)]


def wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def switch(client, tp, pp, mode="migrate", **kw):
    events = list(client.reconfigure(tp, pp, mode, **kw))
    return events, events[-1]


def test_thirty_streams_survive_three_switches(client, reference):
    results = [None] * N_STREAMS

    def run(i, ids):
        toks, last = [], None
        for chunk in client.stream(ids, request_id=f"s{i}", max_new_tokens=MAX_NEW):
            toks += chunk.token_ids
            last = chunk
        results[i] = (toks, last.finish_reason)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(N_STREAMS))]
    for t in threads:
        t.start()
    wait_until(lambda: client.status().running_requests >= 8)
    outcomes = []
    for tp, pp, mode in ((1, 4, "migrate"), (4, 1, "recompute"), (2, 2, "migrate")):
        events, last = switch(client, tp, pp, mode)
        assert [pb.ReconfigureEvent.Kind.Name(e.kind) for e in events][0] == "ACCEPTED"
        assert [e.phase for e in events if e.kind == pb.ReconfigureEvent.PHASE][-1] == "commit"
        assert_prestaged(events, last)
        if mode == "migrate":  # full KV blocks were copied ahead while serving; the rest moved in the pause
            assert 0 < last.kv_blocks_staged <= last.kv_blocks
        else:  # recompute: no KV is migrated, none copied ahead
            assert last.kv_blocks == last.kv_blocks_staged == 0
        outcomes.append(last.kind)
    for t in threads:
        t.join(timeout=300)
    assert outcomes == [pb.ReconfigureEvent.COMMITTED] * 3
    assert all(r is not None for r in results), "a stream was lost"
    for (toks, reason), ref in zip(results, reference):
        assert toks == ref and reason in ("length", "stop")
    st = client.status()
    assert st.topology == "TP2·PP2" and sum(s.committed for s in st.switch_history) >= 3
    assert st.dtype == "float32"  # the checkpoint's dtype: the CPU default


def assert_prestaged(events, last):
    """The weights were staged while serving went on (STAGING events up to every byte), and the
    pause sent only the KV cache: bytes counted by the ranks, not predicted."""
    staging = [e for e in events if e.kind == pb.ReconfigureEvent.STAGING]
    assert staging and staging[-1].bytes == staging[-1].bytes_total > 0
    phase_bytes = {e.phase: e.bytes for e in events if e.kind == pb.ReconfigureEvent.PHASE}
    assert last.prestaged and phase_bytes["move_weights"] > 0
    assert last.bytes_in_pause == phase_bytes["move_kv"]  # no weight byte in the pause
    assert 0 < last.pause_s <= last.downtime_s and last.stall_s >= 0 and last.staging_s > 0


def test_invalid_topology_is_rejected_and_changes_nothing(client):
    before = client.status()
    with pytest.raises(grpc.RpcError) as e:
        switch(client, 3, 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must divide" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the ep field reaches validation (a dense model has no experts)
        switch(client, 2, 2, ep=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ep=2 needs a mixture-of-experts" in e.value.details()
    after = client.status()
    assert after.topology == before.topology and len(after.switch_history) == len(before.switch_history)
    assert client.generate([5, 6, 7], max_new_tokens=2).finish_reason == "length"


def test_second_reconfigure_while_one_runs_is_refused(client):
    long = threading.Thread(target=lambda: client.generate([9, 8, 7], max_new_tokens=200))
    long.start()
    wait_until(lambda: client.status().running_requests >= 1)
    first = []
    t = threading.Thread(target=lambda: first.append(switch(client, 1, 4, "drain")[1]))
    t.start()
    wait_until(lambda: client.status().reconfiguring)
    with pytest.raises(grpc.RpcError) as e:
        switch(client, 4, 1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    t.join(timeout=300)
    long.join(timeout=300)
    assert first[0].kind == pb.ReconfigureEvent.COMMITTED
    assert first[0].drain_s > 0 and first[0].pause_s > 0  # drain time is reported apart from the pause
    switch(client, 2, 2)
    assert client.status().topology == "TP2·PP2"


@pytest.mark.parametrize("build, needle", [
    (lambda: pb.GenerateRequest(), "prompt"),
    (lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 999999])), "token ids"),
    (lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), params=pb.SamplingParams(max_new_tokens=10**6)),
     "max_new_tokens"),
    (lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 129)), "exceeds the server limit"),
    (lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), params=pb.SamplingParams(top_p=0.0)), "top_p"),
    (lambda: pb.GenerateRequest(text="hello"), "no tokenizer"),
])
def test_malformed_requests_get_invalid_argument(client, build, needle):
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Generate(build())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
    assert client.generate([4, 5], max_new_tokens=1).finish_reason == "length"  # still serving


@pytest.mark.parametrize("method", ["/remp.v1.Inference/Generate", "/remp.v1.Inference/GenerateStream"])
def test_bytes_that_do_not_parse_get_invalid_argument(server, client, method):
    call = grpc.insecure_channel(server.addr)
    raw = (call.unary_stream if method.endswith("Stream") else call.unary_unary)(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with call, pytest.raises(grpc.RpcError) as e:
        list(raw(b"\xff\xff\x01", timeout=30)) if method.endswith("Stream") else raw(b"\xff\xff\x01", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in e.value.details() and "does not parse" in e.value.details()
    assert client.generate([4, 5], max_new_tokens=1).finish_reason == "length"  # still serving


def test_rolled_back_switch_reports_why_and_serving_continues(client, reference):
    ids = prompts(4)
    results = [None] * 4

    def run(i):
        results[i] = [t for c in client.stream(ids[i], max_new_tokens=MAX_NEW) for t in c.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: client.status().running_requests >= 2)
    _, last = switch(client, 1, 4, inject_fault="move_kv:2")
    assert last.kind == pb.ReconfigureEvent.ROLLED_BACK and "injected fault" in last.reason and "move_kv" in last.reason
    assert last.prestaged and last.pause_s > 0  # the weights were staged; the pause's KV move failed
    # A failure while staging: the engine never paused, nothing changed.
    events, last = switch(client, 1, 4, inject_fault="build:3")
    assert last.kind == pb.ReconfigureEvent.ROLLED_BACK and "staging failed" in last.reason and "build" in last.reason
    assert last.pause_s == 0 and not any(e.kind == pb.ReconfigureEvent.PHASE for e in events)
    assert client.status().switch_history[-1].failed_phase == "staging:build"
    for t in threads:
        t.join(timeout=300)
    assert results == reference[:4]
    assert client.status().topology == "TP2·PP2"


def test_client_disconnect_cancels_and_frees_blocks(client, scrape):
    """A client that goes away (a stream it drops, a unary call past its deadline) cancels its
    request: the blocks are freed and it counts as cancelled (a request run to its length, with
    nobody reading, would count nowhere)."""
    cancelled = 'remp_requests_total{finish_reason="cancelled"}'
    before = scrape().get(cancelled, 0)
    call = client.stream([3, 1, 4, 1, 5], request_id="gone", max_new_tokens=250)
    next(call)
    wait_until(lambda: client.status().kv_blocks_used > 0, 10)  # load as of the core's last heartbeat (0.2 s)
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        client.generate([2, 7, 1, 8], request_id="late", max_new_tokens=250, timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: client.status().kv_blocks_used == 0 and client.status().running_requests == 0, 30)
    assert scrape().get(cancelled, 0) == before + 2
    assert client.cancel("gone") is False and client.cancel("late") is False  # already cancelled


def remp(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def test_cli_against_live_server(server):
    st = json.loads(remp("status", "--addr", server.addr, "--json").stdout)
    assert st["topology"] == "TP2·PP2" and st["world_size"] == 4
    assert remp("health", "--addr", server.addr).stdout.strip() == "SERVING"
    events = [json.loads(line) for line in remp("reconfigure", "--tp", "1", "--pp", "2", "--addr", server.addr,
                                                  "--json").stdout.splitlines()]
    assert events[0]["kind"] == "ACCEPTED" and events[-1]["kind"] == "COMMITTED"
    assert json.loads(remp("status", "--addr", server.addr, "--json").stdout)["standby_ranks"] == [2, 3]
    out = remp("reconfigure", "--tp", "2", "--pp", "2", "--addr", server.addr).stdout
    assert "committed: TP1·PP2 -> TP2·PP2" in out and "move_weights" in out
    bad = remp("generate", "hello", "--addr", server.addr, check=False)  # tiny model: no tokenizer
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr


def test_metrics_endpoint(server, client, scrape):
    gauges = ("remp_running_requests", "remp_kv_blocks_used", "remp_queue_depth")
    wait_until(lambda: [scrape()[g] for g in gauges] == [0, 0, 0], 10)  # the last heartbeat's load: idle
    values = scrape()
    # Earlier tests in this module served requests and switched: the counters must show it.
    assert values["remp_ttft_seconds_count"] > 30 and values["remp_generated_tokens_total"] > 30 * MAX_NEW
    assert values['remp_switches_total{outcome="committed"}'] >= 3
    assert values['remp_switches_total{outcome="rolled_back"}'] >= 1
    assert values['remp_switch_phase_seconds_count{phase="move_kv"}'] >= 3
    # Gauges follow the engine (its load as last reported over the link): none running, one, then none.
    call = client.stream([3, 1, 4, 1, 5], request_id="metered", max_new_tokens=250)
    next(call)
    wait_until(lambda: scrape()["remp_running_requests"] == 1, 10)
    busy = scrape()
    assert busy["remp_running_requests"] == 1 and busy["remp_kv_blocks_used"] >= 1
    assert busy["remp_kv_blocks_used"] + busy["remp_kv_blocks_free"] == values["remp_kv_blocks_free"]
    call.cancel()
    wait_until(lambda: scrape()["remp_kv_blocks_used"] == 0 and scrape()["remp_running_requests"] == 0, 30)


def test_policy_switches_on_its_own_under_a_burst_and_replay_is_answered(server, client):
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_workload import Arrival, replay

    before = client.status()
    assert before.topology == "TP2·PP2"  # the latency-optimal topology: only a burst makes the policy leave it
    state = client.set_policy(True)
    assert state.enabled and (state.latency_best, state.throughput_best) == ("2x2", "1x4")
    trace = [Arrival(0.05 * i, 8 + i, 40) for i in range(12)]  # a burst: 12 requests in 0.6 s
    results = replay(server.addr, trace, vocab=256, seed=0)
    assert all(r["tokens"] == 40 and r["finish_reason"] == "length" for r in results)  # every request answered
    wait_until(lambda: any(s.origin == "policy" for s in client.status().switch_history), 60)
    st = client.status()
    decision = next(d for d in st.policy.decisions if d.switched)
    assert decision.current == "2x2" and decision.wanted == "1x4" and "load" in decision.reason
    own = [s for s in st.switch_history[len(before.switch_history):] if s.origin == "policy"]
    assert own[0].source == "TP2·PP2" and own[0].target == "TP1·PP4" and own[0].committed
    client.set_policy(False)
    wait_until(lambda: not client.status().reconfiguring, 60)
    switch(client, 2, 2)


def test_outputs_from_the_link_thread_reach_each_stream_in_order_with_one_wake_up():
    """service._LoopInbox: outputs put from another thread before the loop runs arrive, per stream
    in order, through one scheduled flush (one self-pipe write for a whole step's tokens)."""
    import asyncio

    from server.service import _LoopInbox

    async def main():
        loop = asyncio.get_running_loop()
        inbox = _LoopInbox.of(loop)
        assert _LoopInbox.of(loop) is inbox
        queues = [asyncio.Queue() for _ in range(4)]
        wakes = []
        real = loop.call_soon_threadsafe

        def counted(*args):
            wakes.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counted
        sender = threading.Thread(target=lambda: [inbox.put(queues[i % 4], (i, None)) for i in range(64)])
        sender.start()
        sender.join()  # the loop has not run in between: one wake-up for all 64
        got = [[(await q.get())[0] for _ in range(16)] for q in queues]
        assert got == [list(range(k, 64, 4)) for k in range(4)]
        assert len(wakes) == 1
        inbox.put(queues[0], (64, None))  # after a flush the next output wakes the loop again
        assert (await queues[0].get())[0] == 64 and len(wakes) == 2

    asyncio.run(main())
