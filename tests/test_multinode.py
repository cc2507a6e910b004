"""Multi-node serving on loopback: two torchrun agents as two "nodes" (`remp serve` with its front
end, and `remp join`) rendezvous over c10d into one world; rank 0 may land on either node and
connects back to the one front end. It serves HF-exact, switches topology across the nodes and
shuts down cleanly on both."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import Server
from remp_megatron.runtime import free_port
from server.client import RempClient

pytestmark = pytest.mark.world

TOKEN = "multi-node-token"
PROMPT = [5, 17, 42, 9, 77, 3]


@pytest.fixture(scope="module")
def nodes(llama_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "token").write_text(TOKEN)
    link_port, rdzv = free_port(), free_port()
    torchrun = ["--", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
                "--rdzv-id", "remp-multinode"]
    with open(tmp / "join.log", "w") as log:  # the second node first: the first waits for it to serve
        joined = subprocess.Popen([sys.executable, "-m", "server.cli", "join", "--link", f"tcp://127.0.0.1:{link_port}",
                                   "--nproc", "1", "--admin-token-file", str(tmp / "token"), *torchrun],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        head = Server(tmp, llama_mg, 1, 1, 2, "--admin-token-file", str(tmp / "token"), "--link-port",
                      str(link_port), *torchrun)
    except Exception:
        joined.kill()
        raise
    yield head, joined, tmp / "join.log"
    head.stop()
    joined.kill()


def test_two_nodes_serve_switch_across_them_and_shut_down(nodes, llama_hf):
    from transformers import AutoModelForCausalLM

    head, joined, join_log = nodes
    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT):].tolist()
    with RempClient(head.addr, token=TOKEN) as c:
        st = c.status()
        assert st.world_size == 2 and len({r.pid for r in st.ranks}) == 2 and st.topology == "TP1·PP2"
        assert c.generate(PROMPT, max_new_tokens=16).token_ids == ref
        events = list(c.reconfigure(2, 1))
        assert events[-1].kind == events[-1].COMMITTED, events[-1].reason
        assert c.generate(PROMPT, max_new_tokens=16).token_ids == ref
        assert c.status().topology == "TP2·PP1"
    assert head.stop() == 0
    assert joined.wait(60) == 0
    # rank 0 is on whichever node rendezvous put it (either log); the front end stayed where `remp serve` ran
    logs = head.log_path.read_text() + join_log.read_text()
    assert "rank 0 exited cleanly" in logs and "rank 1 exited cleanly" in logs
    assert "front end exited cleanly" in head.log_path.read_text()
