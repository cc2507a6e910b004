"""The front end ⇄ engine core link over real ZeroMQ sockets on loopback: a burst of outputs
arrives whole and in order (nothing dropped at a high-water mark); bytes that are no message are
ignored; the front end's journal re-admits what a lost core left."""
import os
import queue
import threading
import time
from pathlib import Path

import pytest
import zmq

from remp_megatron.topology import Topology
from server import link
from server.config import ServerConfig
from server.engine_client import EngineClient
from test_spec_topology import spec


def test_a_burst_of_token_outputs_arrives_whole_and_in_order():
    n, got, done = 20_000, [], threading.Event()

    def on_message(_peer, msg):
        got.append(msg.token_ids[0])
        if len(got) == n:
            done.set()

    front, address = link.bind("127.0.0.1", 0, on_message, "test-front")
    core = link.connect(address, lambda msg: None, "test-core")
    try:
        for i in range(n):  # far past ZeroMQ's default high-water mark of 1000 queued messages
            core.send(link.TokenOutput(f"r{i % 7}", [i]))
        assert done.wait(60), f"{len(got)} of {n} arrived"
        assert got == list(range(n))
    finally:
        core.close()
        front.close()


def test_an_idle_link_thread_sleeps():
    """The link thread blocks in its poll between messages (a wake-up left unread once made it
    spin a core in every process)."""
    front, address = link.bind("127.0.0.1", 0, lambda _peer, msg: None, "test-front")
    core = link.connect(address, lambda msg: None, "test-core")
    try:
        core.send(link.TokenOutput("r", [1]))
        time.sleep(0.2)
        before = {lk: cpu_seconds(lk._thread) for lk in (front, core)}
        time.sleep(1.0)
        used = {lk._thread.name: cpu_seconds(lk._thread) - s for lk, s in before.items()}
        assert max(used.values()) < 0.2, used  # a spinning thread uses ~1 s of the second
    finally:
        core.close()
        front.close()


def cpu_seconds(thread: threading.Thread) -> float:
    """CPU time (user + system) of ``thread`` so far, from /proc (Linux)."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_closed_link_drops_what_is_sent_and_leaves_other_links_alone():
    """Threads may still send after a link closed (a core being replaced); that must not fail
    them or touch the descriptors a newer link got (a flake once: EBADF closing a newer link)."""
    got = queue.Queue()
    front, address = link.bind("127.0.0.1", 0, lambda _peer, msg: got.put(msg), "test-front")
    old = link.connect(address, lambda msg: None, "test-old")
    old.close()
    new = link.connect(address, lambda msg: None, "test-new")
    try:
        for _ in range(3):
            old.send(link.TokenOutput("old", [1]))
        old.close()
        new.send(link.TokenOutput("new", [2]))
        assert got.get(timeout=30).request_id == "new" and got.empty()
    finally:
        new.close()
        front.close()


def test_malformed_bytes_on_the_link_are_ignored():
    got, done = [], threading.Event()

    def on_message(_peer, msg):
        got.append(msg)
        done.set()

    front, address = link.bind("127.0.0.1", 0, on_message, "test-front")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(address)
    core = link.connect(address, lambda msg: None, "test-core")
    try:
        raw.send(b"\x93not a message")
        core.send(link.Heartbeat(1, 2, 3, 4, False))
        assert done.wait(30)
        assert got == [link.Heartbeat(1, 2, 3, 4, False)]
    finally:
        raw.close(linger=0)
        core.close()
        front.close()


def test_the_front_end_readmits_what_a_lost_core_left_with_its_streamed_tokens():
    """The journal over a real link, a test process playing two engine cores in turn: after a
    restart, unfinished requests come back with prompt + streamed tokens and their seed; one
    cancelled before the loss (never confirmed) ends CANCELLED instead of running again."""
    from remp_megatron.request import Request, SamplingParams

    client = EngineClient(ServerConfig(model="/nonexistent", tp=1, pp=1), spec(), 1)
    client.set_eos([2])
    outputs = {"keep": [], "drop": []}

    def core(name):
        c, inbox, _ = join_as_core(client, name, 1)
        c.send(link.Ready(1, 1, 1, "float32", 64, 0.1))
        return c, inbox

    first, inbox = core("core-1")
    wait(lambda: client.serving)
    for rid in outputs:
        client.add_request(Request(request_id=rid, prompt_token_ids=[5, 6, 7], params=SamplingParams(temperature=1.0)),
                           outputs[rid].append)
    adds = [inbox.get(timeout=30) for _ in range(2)]
    seeds = {a.request_id: a.params["seed"] for a in adds}
    first.send(link.TokenOutput("keep", [11]))
    first.send(link.TokenOutput("drop", [12]))
    wait(lambda: all(outputs.values()))
    assert client.cancel("drop")
    assert isinstance(inbox.get(timeout=30), link.Cancel)
    first.close()  # the core is lost before it confirmed the cancel

    second, inbox = core("core-2")
    again = inbox.get(timeout=30)
    assert (again.request_id, again.prompt, again.output, again.params["seed"]) == ("keep", [5, 6, 7], [11], seeds["keep"])
    time.sleep(0.3)  # anything else re-admitted would have arrived by now
    assert inbox.empty() and client.restarts == 1
    wait(lambda: outputs["drop"][-1].finished)
    assert outputs["drop"][-1].finish_reason.value == "cancelled" and not outputs["keep"][-1].finished
    second.close()
    client.link.close()


def test_a_shrunk_world_starts_where_the_cost_profile_says_and_each_core_gets_the_profile():
    """The profile file is read on the front end's host (a core on another node may not have it)."""
    from remp_megatron.policy import CostProfile, TopologyCost

    profile = CostProfile((TopologyCost(Topology(1, 2), tpot_s=0.01, tokens_per_s=10.0),
                           TopologyCost(Topology(2, 1), tpot_s=0.05, tokens_per_s=50.0)))
    client = EngineClient(ServerConfig(model="/nonexistent", tp=2, pp=2), spec(), 4, profile=profile)
    client.set_eos([2])
    first, _, start = join_as_core(client, "core-1", 4)
    assert (start.tp, start.pp) == (2, 2) and CostProfile.from_json(start.profile) == profile
    first.close()
    second, _, start = join_as_core(client, "core-2", 2)  # TP2·PP2 no longer fits
    # nothing pending: the profile's latency-best among what fits (the largest would be TP2·PP1)
    assert (start.tp, start.pp) == (1, 2) and CostProfile.from_json(start.profile) == profile
    second.close()
    client.link.close()


def test_a_world_reformed_while_the_server_shuts_down_is_told_to_exit():
    """SIGTERM while torchrun re-forms the world: the new core's ranks exit at once (exit code 0,
    torchrun then too) instead of loading and being killed after a timeout; nothing has failed."""
    client = EngineClient(ServerConfig(model="/nonexistent", tp=1, pp=1), spec(), 1)
    client.set_eos([2])
    client.shutdown_engine()  # no core is connected: the old one is gone
    core, _, start = join_as_core(client, "core-late", 1, refused=True)
    assert start.refused == "the server is shutting down" and client.failure is None
    core.close()
    client.link.close()


def test_a_cancelled_request_frees_its_queue_slot_before_the_core_confirms():
    from remp_megatron.config import EngineConfig
    from remp_megatron.request import Request, SamplingParams
    from remp_megatron.scheduler import QueueFull

    client = EngineClient(ServerConfig(model="/nonexistent", tp=1, pp=1, engine=EngineConfig(max_queue=1)), spec(), 1)
    client.set_eos([2])
    core, inbox, _ = join_as_core(client, "core", 1)
    core.send(link.Ready(1, 1, 1, "float32", 64, 0.1))
    wait(lambda: client.serving)

    def add(rid):
        client.add_request(Request(request_id=rid, prompt_token_ids=[5, 6], params=SamplingParams()), lambda out: None)

    add("a")
    with pytest.raises(QueueFull):
        add("b")
    assert client.cancel("a")  # the core (this test) never confirms
    add("b")
    core.close()
    client.link.close()


def join_as_core(client, name: str, world: int, refused: bool = False):
    """Connect to ``client``'s link as an engine core of ``world`` ranks: (link, inbox, its Start)."""
    inbox = queue.Queue()
    c = link.connect(client.address, inbox.put, name)
    c.send(link.Join(client.secret, world, [link.RankInfo(r, "h", 1 + r) for r in range(world)]))
    start = inbox.get(timeout=30)
    assert isinstance(start, link.Start) and bool(start.refused) == refused, start
    return c, inbox, start


def wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
