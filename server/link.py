"""The link between the front end (the `remp serve` process) and the engine core (rank 0 under
torchrun): small typed messages over ZeroMQ.

Why ZeroMQ (pyzmq) with msgspec structs (MessagePack): the front end binds one ROUTER socket on a
fixed host and port, and whichever process holds rank 0 connects to it — after a restart, or on
whichever node rendezvous put rank 0 — with no ordering between the two; ZeroMQ reconnects and
queues, and a ROUTER addresses one peer, so messages of a dead incarnation are told apart by its
routing id. msgspec decodes into typed structs (never pickle: the port may listen beyond loopback)
at a few µs per message. gRPC would need the core to serve a port the front end must then find.

Each side owns its socket on one thread (ZeroMQ sockets are not thread-safe): ``Link.send`` queues
and wakes that thread through a socket pair; received messages go to one callback on that thread.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
from typing import Callable, Optional, Union

import msgspec
import zmq

log = logging.getLogger("remp.link")

# The core reports its load this often; the front end takes it for dead after LINK_TIMEOUT_S of silence.
HEARTBEAT_S = 0.2
LINK_TIMEOUT_S = 3.0
# The front end passes the link's address and secret to the ranks in these environment variables.
LINK_ADDRESS_ENV = "REMP_LINK"
LINK_SECRET_ENV = "REMP_LINK_SECRET"


# ---- front end -> engine core ---------------------------------------------------------------
class Start(msgspec.Struct, tag=True):
    """The answer to Join: the server config (ServerConfig JSON), the topology to load (the last
    committed one) and the end-of-text ids; or ``refused`` (why this world cannot serve): every
    rank then exits 0."""

    config: str
    tp: int
    pp: int
    ep: int
    eos_token_ids: list[int]
    profile: str = ""  # the policy's cost profile (CostProfile JSON), read by the front end: "" for none
    refused: str = ""


class Add(msgspec.Struct, tag=True):
    """Admit a request. ``output``: tokens already streamed to the client (re-admission after a
    restart): the core recomputes their KV and continues from there."""

    request_id: str
    prompt: list[int]
    params: dict  # SamplingParams fields, validated again by the core
    output: list[int] = []


class Cancel(msgspec.Struct, tag=True):
    request_id: str


class Reconfigure(msgspec.Struct, tag=True):
    call_id: int
    tp: int
    pp: int
    ep: int
    mode: str
    fault_phase: str = ""
    fault_rank: int = 0


class SetPolicy(msgspec.Struct, tag=True):
    call_id: int
    enabled: bool


class Shutdown(msgspec.Struct, tag=True):
    """Stop the engine and release every rank (they exit 0)."""


ToCore = Union[Start, Add, Cancel, Reconfigure, SetPolicy, Shutdown]


# ---- engine core -> front end ---------------------------------------------------------------
class RankInfo(msgspec.Struct):
    rank: int
    host: str
    pid: int


class Join(msgspec.Struct, tag=True):
    """A new engine core (first start or restart) asks what to load. ``secret``: the one the front
    end gave torchrun's environment (LINK_SECRET_ENV); a peer without it is ignored."""

    secret: str
    world: int
    ranks: list[RankInfo]


class Ready(msgspec.Struct, tag=True):
    """Weights loaded at (tp, pp, ep): serving."""

    tp: int
    pp: int
    ep: int
    dtype: str
    num_blocks: int
    load_s: float


class TokenOutput(msgspec.Struct, tag=True):
    """A request's next token (one per step), or its end: ``finish_reason`` (a FinishReason value)."""

    request_id: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    error: str = ""  # the core could not take the request (a bug: the front end checks requests first)


class Heartbeat(msgspec.Struct, tag=True):
    queued: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    reconfiguring: bool
    policy: bytes = b""  # pb.PolicyState, when the server has a policy
    policy_decisions: dict[str, int] = {}  # "switch"/"stay" -> count since this core started


class SwitchEvent(msgspec.Struct, tag=True):
    """A pb.ReconfigureEvent of the call ``call_id`` (0: a switch the policy started)."""

    call_id: int
    event: bytes


class SwitchDone(msgspec.Struct, tag=True):
    """A switch ended (any origin): its pb.SwitchRecord and phase times, for history and metrics."""

    record: bytes
    phases: dict[str, float]


class Reply(msgspec.Struct, tag=True):
    """The end of a call: ``payload`` (pb bytes) or ``error`` with an ErrorKind value. A
    Reconfigure call's SwitchEvents come before it."""

    call_id: int
    payload: bytes = b""
    error: str = ""
    error_kind: str = ""


ToFrontend = Union[Join, Ready, TokenOutput, Heartbeat, SwitchEvent, SwitchDone, Reply]


class Link:
    """One ZeroMQ socket driven by its own thread. ``send`` is thread-safe; ``on_message(peer,
    msg)`` runs on the link thread (peer: the sender's routing id on a ROUTER, else b"")."""

    def __init__(self, sock: zmq.Socket, inbound: type, on_message: Callable[[bytes, object], None], name: str):
        self.sock, self.on_message = sock, on_message
        self._router = sock.socket_type == zmq.ROUTER
        self._decode = msgspec.msgpack.Decoder(inbound).decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        # Wake-ups for the link thread. Socket objects, not raw pipe fds: a closed one fails
        # cleanly instead of its number, reused by then, reaching another link's descriptor.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, msg, peer: bytes = b"") -> None:
        """Queue ``msg``; after ``close`` it is dropped (nothing is sent any more)."""
        self._out.put((peer, self._encode(msg)))
        self._wake()

    def close(self) -> None:
        self._closed.set()
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # its buffer is full of wake-ups: the thread wakes anyway
        except OSError:
            if not self._closed.is_set():
                raise

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._closed.is_set():
            ready = dict(poller.poll(1000))
            if self._wake_r.fileno() in ready:  # the poller reports a non-zmq socket by its fd
                self._wake_r.recv(65536)
            while True:
                try:
                    peer, data = self._out.get_nowait()
                except queue.Empty:
                    break
                try:
                    self.sock.send_multipart([peer, data] if self._router else [data], zmq.NOBLOCK)
                except zmq.ZMQError as e:  # a ROUTER peer that is gone: the message is moot
                    log.log(logging.DEBUG if e.errno == zmq.EHOSTUNREACH else logging.WARNING,
                            "dropped a message to %r: %s", peer, e)
            while self.sock.poll(0, zmq.POLLIN):
                frames = self.sock.recv_multipart()
                peer, data = (frames[0], frames[-1]) if self._router else (b"", frames[-1])
                try:
                    msg = self._decode(data)
                except msgspec.DecodeError as e:
                    log.warning("ignored a malformed link message: %s", e)
                    continue
                self.on_message(peer, msg)
        self.sock.close(linger=0)
        self._wake_r.close()
        self._wake_w.close()


def _socket(kind: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    # No high-water mark: a burst of outputs queues instead of being dropped (a send never blocks the
    # link thread); what is queued for a peer that died goes with its pipe.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def bind(host: str, port: int, on_message, name: str = "link") -> tuple[Link, str]:
    """The front end's end: a ROUTER on ``host``:``port`` (0: any free port); returns it and the
    address ranks connect to (this host's name when bound to all interfaces)."""
    sock = _socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises (logged) instead of vanishing
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    reachable = socket.gethostname() if host in ("0.0.0.0", "::", "*") else host
    return Link(sock, ToFrontend, on_message, name), f"tcp://{reachable}:{port}"


def connect(address: str, on_message, name: str = "link") -> Link:
    """The engine core's end: a DEALER connected to the front end."""
    sock = _socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)  # the last outputs reach the front end before exit
    sock.connect(address)
    return Link(sock, ToCore, lambda _peer, msg: on_message(msg), name)
