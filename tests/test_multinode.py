"""Multi-node serving on loopback: two torchrun agents as separate "nodes" (`remp serve` with the
front end, and `remp join`) rendezvous over c10d into one world; rank 0 lands on either node and
connects back to the one front end. It serves HF-exact while streams run, switches
topology across the nodes, and shuts down cleanly on every node."""
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import torch

from conftest import Server
from remp_megatron.runtime import free_port
from server.client import RempClient
from test_recovery import wait_until

pytestmark = pytest.mark.world

TOKEN = "multi-node-token"
PROMPTS = [[5, 17, 42, 9, 77, 3], [8, 1, 200, 31]]
MAX_NEW = 48


class Node:
    """`remp join --nproc N` with the test's torchrun flags, logging to ``tmp/NAME.log``."""

    def __init__(self, tmp, name: str, nproc: int, link_port: int, torchrun: list[str]):
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "join", "--link", f"tcp://127.0.0.1:{link_port}", "--nproc",
                 str(nproc), "--admin-token-file", str(tmp / "token"), "--max-restarts", "5", *torchrun],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def vanish(self) -> None:
        """The node is gone at once (SIGKILL to it, its torchrun agent and ranks): nothing says goodbye."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for p in procs:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def cluster(llama_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "token").write_text(TOKEN)
    link_port, rdzv = free_port(), free_port()
    torchrun = ["--", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
                "--rdzv-id", "remp-multinode"]
    nodes = {"a": Node(tmp, "node-a", 1, link_port, torchrun)}
    try:
        head = Server(tmp, llama_mg, 1, 1, 2, "--admin-token-file", str(tmp / "token"), "--link-port",
                      str(link_port), "--max-restarts", "5", *torchrun)
    except Exception:
        for n in nodes.values():
            n.vanish()
        raise
    yield head, nodes
    head.stop()
    for n in nodes.values():
        if n.proc.poll() is None:
            n.vanish()


@pytest.fixture(scope="module")
def refs(llama_hf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]


def streams(client, got):
    def run(i):
        got[i] = [t for chunk in client.stream(PROMPTS[i], max_new_tokens=MAX_NEW) for t in chunk.token_ids]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    return threads


def test_two_nodes_serve_and_switch_across_them_and_shut_down(cluster, refs):
    head, nodes = cluster
    with RempClient(head.addr, token=TOKEN) as c:
        st = c.status()
        assert st.world_size == 2 and st.topology == "TP1·PP2" and len({r.pid for r in st.ranks}) == 2
        assert [c.generate(p, max_new_tokens=MAX_NEW).token_ids for p in PROMPTS] == refs
        got: dict = {}
        threads = streams(c, got)
        wait_until(lambda: c.status().running_requests == 2)
        events = list(c.reconfigure(2, 1))  # across the nodes, under load
        assert events[-1].kind == events[-1].COMMITTED, events[-1].reason
        for t in threads:
            t.join(180)
        assert [got.get(i) for i in range(len(PROMPTS))] == refs
        assert c.status().topology == "TP2·PP1"
    assert head.stop() == 0
    assert all(n.proc.wait(60) == 0 for n in nodes.values())
    # rank 0 is on whichever node rendezvous put it; the front end stayed where `remp serve` ran
    logs = "".join(p.read_text() for p in head.log_path.parent.glob("*.log"))
    assert all(f"rank {r} exited cleanly" in logs for r in range(2))
    assert "front end exited cleanly" in head.log_path.read_text()
