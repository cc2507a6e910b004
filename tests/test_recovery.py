"""Rank loss: the front end (`remp serve`) outlives the engine's ranks. A SIGKILLed rank — a worker,
then the one driving the engine — makes torchrun re-form the world; streams in flight and
requests still waiting finish with HF's tokens, health comes back. When torchrun's restarts are
exhausted, requests end UNAVAILABLE with the reason, and the server says why."""
import os
import signal
import threading

import grpc
import pytest
import torch

from conftest import Server
from server.client import RempClient

pytestmark = pytest.mark.world

MAX_NEW = 64
N_STREAMS = 4  # --max-num-seqs 2: two run, two wait in the queue when a rank dies


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(N_STREAMS)]


def hf_greedy(llama_hf, max_new: int = MAX_NEW) -> list[list[int]]:
    """HF's greedy continuation of each of ``prompts()``, ``max_new`` tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    return [hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)[0, len(p):].tolist()
            for p in prompts()]


@pytest.fixture(scope="module")
def reference(llama_hf):
    return hf_greedy(llama_hf)


@pytest.fixture(scope="module")
def server(llama_mg, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("recovery"), llama_mg, 2, 1, 2, "--max-restarts", "2", "--max-num-seqs", "2",
               "--max-new-tokens", str(MAX_NEW))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with RempClient(server.addr) as c:
        yield c


def wait_until(cond, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Streams:
    """N_STREAMS greedy streams of ``max_new`` tokens in threads: their tokens, and how each ended
    (reason or error)."""

    def __init__(self, client, max_new: int = MAX_NEW):
        self.tokens = [[] for _ in range(N_STREAMS)]
        self.ends: list = [None] * N_STREAMS
        self.threads = [threading.Thread(target=self._run, args=(client, i, p, max_new), daemon=True)
                        for i, p in enumerate(prompts())]
        for t in self.threads:
            t.start()

    def _run(self, client, i, prompt, max_new):
        try:
            for chunk in client.stream(prompt, max_new_tokens=max_new):
                self.tokens[i] += chunk.token_ids
                if chunk.finished:
                    self.ends[i] = chunk.finish_reason
        except grpc.RpcError as e:
            self.ends[i] = e

    def join(self):
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"

    def finish(self) -> list[list[int]]:
        """Each stream's tokens, once every one has ended normally."""
        self.join()
        assert all(end in ("length", "stop") for end in self.ends), self.ends
        return self.tokens


def kill_rank_mid_stream(client, rank: int) -> Streams:
    """Start the streams; once some have tokens and some still wait, SIGKILL ``rank``."""
    streams = Streams(client)
    wait_until(lambda: sum(len(t) >= 5 for t in streams.tokens) >= 1 and client.status().queue_depth >= 1)
    pid = next(r.pid for r in client.status().ranks if r.rank == rank)
    os.kill(pid, signal.SIGKILL)
    return streams


@pytest.mark.parametrize("rank", [1, 0], ids=["worker-rank", "engine-rank"])
def test_streams_and_queue_survive_a_killed_rank(server, client, reference, rank):
    before = client.status()
    streams = kill_rank_mid_stream(client, rank)
    assert streams.finish() == reference  # continued exactly where each stream was
    st = client.status()
    assert st.restarts == before.restarts + 1 and st.serving and client.health() == "SERVING"
    assert st.topology == "TP1·PP2" and not {r.pid for r in st.ranks} & {r.pid for r in before.ranks}
    log = server.log_path.read_text()
    assert f"engine core restarted (restart {st.restarts})" in log and "re-admitted" in log


def test_exhausted_restarts_answer_unavailable_with_the_reason(server, client):
    streams = kill_rank_mid_stream(client, 1)  # the third loss: --max-restarts 2 are used up
    streams.join()
    assert all(isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE for e in streams.ends)
    assert "torchrun exited" in streams.ends[0].details()
    st = client.status()
    assert not st.serving and "restart(s) of at most 2" in st.unavailable_reason
    assert client.health() == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as e:
        client.generate([5, 6, 7], max_new_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "torchrun exited" in e.value.details()
    assert server.stop() == 1  # the server failed: its exit code says so
