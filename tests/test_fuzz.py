"""Fuzzing the front end: a few thousand random and malformed messages to every RPC (random
bytes, mutated and truncated valid messages, out-of-range values, huge repeated fields, streams
cut short) while valid streams run. Every call gets a status in time, none is an unhandled
server error, the server keeps serving, nothing leaks, and the valid streams finish HF-exact."""
import random
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from conftest import Server
from server.api import pb
from server.client import RempClient

pytestmark = pytest.mark.world

N_MESSAGES = 2000
MAX_NEW = 32
VALID = [[7, 3, 99, 41, 5], [12, 250, 8, 64], [33, 1, 2, 3, 4, 5, 6]]
METHODS = {  # every RPC, by its wire path: (streaming response?, request type)
    "/remp.v1.Inference/Generate": (False, pb.GenerateRequest),
    "/remp.v1.Inference/GenerateStream": (True, pb.GenerateRequest),
    "/remp.v1.Inference/Cancel": (False, pb.CancelRequest),
    "/remp.v1.Admin/Reconfigure": (True, pb.ReconfigureRequest),
    "/remp.v1.Admin/GetStatus": (False, pb.StatusRequest),
    "/remp.v1.Admin/SetPolicy": (False, pb.SetPolicyRequest),
    "/remp.v1.Admin/Shutdown": (False, pb.ShutdownRequest),
}
# What a malformed call may end with: a refusal naming the problem (bytes that do not parse:
# INVALID_ARGUMENT). UNKNOWN (a handler raised), INTERNAL or DEADLINE_EXCEEDED (wedged) fail.
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture(scope="module")
def server(llama_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "token").write_text("fuzz-token")
    s = Server(tmp, llama_mg, 1, 1, 1, "--max-new-tokens", str(MAX_NEW), "--max-prompt-tokens", "64",
               "--admin-token-file", str(tmp / "token"))
    yield s
    s.stop()


def valid_request(rng: random.Random) -> pb.GenerateRequest:
    ids = [rng.randrange(0, 256) for _ in range(rng.randrange(1, 8))]
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_new_tokens=4))


def bad_generate(rng: random.Random) -> pb.GenerateRequest:
    """Well-formed protobuf, wrong content."""
    choice = rng.randrange(9)
    r = valid_request(rng)
    if choice == 0:
        r.token_ids.ids[:] = [rng.choice([-1, 256, 2**31 - 1, -2**31])]
    elif choice == 1:
        r.token_ids.ids[:] = [5] * rng.choice([65, 1000, 200_000])  # beyond the prompt limit
    elif choice == 2:
        r.params.max_new_tokens = rng.choice([0, -5, MAX_NEW + 1, 2**31 - 1])
    elif choice == 3:
        r.params.temperature = rng.choice([float("nan"), float("-inf"), -1.0, float("inf")])
    elif choice == 4:
        r.params.top_p = rng.choice([0.0, -0.5, 1.5, float("nan")])
        r.params.top_k = rng.choice([-1, -2**31])
    elif choice == 5:
        r.params.stop[:] = [""] if rng.random() < 0.5 else ["x" * 100_000]  # empty, or a stop string without tokenizer
    elif choice == 6:
        r.text = "no tokenizer on this model"
    elif choice == 7:
        r.chat.messages.add(role=rng.choice(["user", "robot", ""]), content="hi")
    else:
        r.ClearField("token_ids")  # no prompt at all
    return r


def malformed_bytes(rng: random.Random, request_type) -> bytes:
    """Random bytes, or a valid message truncated / bit-flipped / with a wrong wire type."""
    choice = rng.randrange(4)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 300))
    data = bytearray(valid_request(rng).SerializeToString() if request_type is pb.GenerateRequest
                     else request_type().SerializeToString() + b"\x08\x01")
    if choice == 1 and data:
        return bytes(data[:rng.randrange(len(data))])
    if choice == 2 and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    return b"\x0d" + struct.pack("<f", rng.random()) + bytes(data)  # field 1 as fixed32: the wrong wire type


def call(channel, method: str, payload: bytes, token: bool) -> grpc.StatusCode:
    streaming, _ = METHODS[method]
    md = (("authorization", "Bearer fuzz-token"),) if token else ()
    ident = lambda b: b  # noqa: E731 - raw bytes on the wire
    try:
        if streaming:
            it = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(
                payload, timeout=30, metadata=md)
            for _ in it:
                pass
        else:
            channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(
                payload, timeout=30, metadata=md)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def fuzz_one(channel, seed: int) -> tuple[str, grpc.StatusCode]:
    rng = random.Random(seed)
    method = rng.choice(sorted(METHODS))
    _, request_type = METHODS[method]
    kind = rng.randrange(4)
    if method == "/remp.v1.Admin/Shutdown" or (kind == 0 and method.startswith("/remp.v1.Admin")):
        token = False  # admin without the token: refused before anything happens (Shutdown always)
    else:
        token = method in ("/remp.v1.Admin/Reconfigure", "/remp.v1.Admin/GetStatus", "/remp.v1.Admin/SetPolicy")
    if method == "/remp.v1.Admin/Reconfigure" and token:  # authorized, but no valid target on one rank
        msg = pb.ReconfigureRequest(tp=rng.choice([0, -1, 2, 1000]), pp=rng.choice([0, 1, 3, -7]),
                                    mode=rng.choice(["", "migrate", "teleport"]))
        return method, call(channel, method, msg.SerializeToString(), token)
    if kind == 1 and request_type is pb.GenerateRequest:
        return method, call(channel, method, bad_generate(rng).SerializeToString(), token)
    if kind == 2 and method == "/remp.v1.Inference/GenerateStream":  # a stream the client cuts short
        it = channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
            valid_request(rng).SerializeToString(), timeout=30)
        next(it, None)
        it.cancel()
        return method, grpc.StatusCode.CANCELLED
    if kind == 3 and method == "/remp.v1.Inference/Cancel":
        msg = pb.CancelRequest(request_id=rng.choice(["", "nope", "\u0000" * 10, "r" * 10_000]))
        return method, call(channel, method, msg.SerializeToString(), token)
    return method, call(channel, method, malformed_bytes(rng, request_type), token)


def test_fuzzed_messages_to_every_rpc_while_valid_streams_run(server, llama_hf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):].tolist()
            for p in VALID]
    got: dict[int, list[int]] = {}
    with RempClient(server.addr, token="fuzz-token") as c:
        def valid(i: int) -> None:
            got[i] = [t for chunk in c.stream(VALID[i], max_new_tokens=MAX_NEW) for t in chunk.token_ids]

        streams = [threading.Thread(target=valid, args=(i,)) for i in range(len(VALID))]
        for t in streams:
            t.start()
        with grpc.insecure_channel(server.addr) as channel, ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda seed: fuzz_one(channel, seed), range(N_MESSAGES)))
        for t in streams:
            t.join(120)
        assert [got.get(i) for i in range(len(VALID))] == refs
        bad = [(m, code) for m, code in results if code not in EXPECTED | {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}]
        assert not bad, f"{len(bad)} calls ended unexpectedly, e.g. {bad[:5]}"
        assert {m for m, _ in results} == set(METHODS)  # every RPC was fuzzed
        assert c.health() == "SERVING" and server.proc.poll() is None
        st = c.status()
        assert st.topology == "TP1·PP1" and st.switch_history == []
        # nothing left behind: every fuzzed request finished or was cancelled, its KV blocks freed
        from test_server import wait_until

        wait_until(lambda: (c.status().running_requests, c.status().queue_depth, c.status().kv_blocks_used) == (0, 0, 0))
        assert c.generate(VALID[0], max_new_tokens=MAX_NEW).token_ids == refs[0]
