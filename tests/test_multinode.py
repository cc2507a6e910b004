"""Multi-node, elastic, on loopback: torchrun agents as separate "nodes" (`remp serve` with the
front end, `remp join` for the others) rendezvous over c10d with `--nnodes 2:3`; rank 0 lands on
any node and connects back to the one front end. The world grows when a node joins and shrinks
when one vanishes for good; each time the engine restarts at the best topology that fits and
every request finishes with HF's tokens. A switch crosses nodes; every node shuts down cleanly."""
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import Server
from remp_megatron.runtime import free_port
from server.client import RempClient
from test_recovery import Streams, hf_greedy, wait_until

pytestmark = pytest.mark.world

TOKEN = "multi-node-token"
MAX_NEW = 24  # long enough to lose a node mid-stream
# A lost node is dead after 3 missed 1 s keep-alives; a re-formed round waits 2 s for more nodes.
RDZV_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"


class Node:
    """`remp join --nproc N` with the cluster's torchrun flags, logging to ``tmp/NAME.log``."""

    def __init__(self, tmp, name: str, nproc: int, link_port: int, torchrun: list[str]):
        with open(tmp / f"{name}.log", "w") as log:
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


class Cluster:
    """The head (`remp serve`: the front end, one rank, TP2·PP2 asked for) and the nodes that join it."""

    def __init__(self, tmp):
        (tmp / "token").write_text(TOKEN)
        self.tmp, self.link_port, self.rdzv, self.nodes, self.head = tmp, free_port(), free_port(), {}, None

    def torchrun(self, hosts_rendezvous: bool) -> list[str]:
        # On loopback every node's address matches the endpoint: say which one hosts the rendezvous
        # store (the head's agent, as on real hosts), so it is not on a node that vanishes.
        return ["--", "--nnodes", "2:3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.rdzv}",
                "--rdzv-id", "remp-multinode", "--rdzv-conf", f"{RDZV_CONF},is_host={int(hosts_rendezvous)}"]

    def start(self, model) -> None:
        self.add("a", 2)  # first: its agent becomes rendezvous rank 0, holding global ranks 0 and 1
        self.head = Server(self.tmp, model, 1, 2, 2, "--admin-token-file", str(self.tmp / "token"), "--link-port",
                           str(self.link_port), "--max-restarts", "5", "--max-num-seqs", "2", "--max-new-tokens",
                           str(MAX_NEW), *self.torchrun(True))

    def add(self, name: str, nproc: int) -> Node:
        self.nodes[name] = Node(self.tmp, f"node-{name}", nproc, self.link_port, self.torchrun(False))
        return self.nodes[name]

    def close(self) -> None:
        if self.head is not None:
            self.head.stop()
        for n in self.nodes.values():
            if n.proc.poll() is None:
                n.vanish()


@pytest.fixture(scope="module")
def cluster(llama_mg, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("multinode"))
    try:
        c.start(llama_mg)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(llama_hf):
    return hf_greedy(llama_hf, MAX_NEW)


def serving_world(client, size: int) -> bool:
    st = client.status()
    return st.serving and st.world_size == size


def test_elastic_world_grows_switches_across_nodes_shrinks_and_shuts_down(cluster, reference):
    with RempClient(cluster.head.addr, token=TOKEN) as c:
        # head + node "a": 3 ranks; TP2·PP2 was asked for, TP1·PP1 is the largest that fits (8 layers, 4 KV heads)
        st = c.status()
        assert st.world_size == 3 and st.topology == "TP1·PP1" and len({r.pid for r in st.ranks}) == 3
        assert Streams(c, MAX_NEW).finish() == reference

        # node "b" joins while streams run: the world re-forms at 4 ranks, at the asked TP2·PP2
        streams = Streams(c, MAX_NEW)
        cluster.add("b", 1)
        assert streams.finish() == reference  # whether or not they were in flight when the world re-formed
        wait_until(lambda: serving_world(c, 4), timeout=180)
        assert c.status().topology == "TP2·PP2" and len({r.pid for r in c.status().ranks}) == 4

        # a live switch across the three nodes, under load
        streams = Streams(c, MAX_NEW)
        wait_until(lambda: c.status().running_requests == 2)
        events = list(c.reconfigure(1, 4))  # PP across nodes (TP4's 17 all-reduces a step are slow on 2 cores)
        assert events[-1].kind == events[-1].COMMITTED, events[-1].reason
        assert streams.finish() == reference

        # node "a" vanishes for good mid-stream, with the engine core and the rendezvous round's store:
        # 2 ranks are left, TP1·PP4 no longer fits, TP2·PP1 does; running and queued requests finish exact
        streams = Streams(c, MAX_NEW)
        wait_until(lambda: any(len(t) >= 5 for t in streams.tokens) and c.status().queue_depth >= 1)
        cluster.nodes["a"].vanish()
        assert streams.finish() == reference
        st = c.status()
        assert st.serving and st.world_size == 2 and st.topology == "TP2·PP1" and st.restarts == 2
        assert "engine core restarted (restart 2): 2 ranks on" in cluster.head.log_path.read_text()

    assert cluster.head.stop() == 0
    assert cluster.nodes["b"].proc.wait(60) == 0
    logs = "".join(p.read_text() for p in cluster.tmp.glob("*.log"))
    assert all(f"rank {r} exited cleanly" in logs for r in range(2))
    assert "front end exited cleanly" in cluster.head.log_path.read_text()
