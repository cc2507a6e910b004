"""Server security, admission limits, chat through the CLI and graceful SIGTERM, on a 1-rank
SmolLM2 server with an admin token configured."""
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx2 as httpx
import pytest

from conftest import Server
from server.client import RempClient

pytestmark = pytest.mark.world
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def server(smol_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin-server")
    (tmp / "token").write_text(TOKEN + "\n")
    s = Server(tmp, smol_mg, 1, 1, 1, "--admin-token-file", str(tmp / "token"), "--max-num-seqs", "1",
               "--max-queue", "2", "--shutdown-grace", "3", "--http-port", "0")
    yield s
    s.stop()


def remp(*args, env=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_admin_without_the_token_is_refused_and_changes_nothing(server, token, monkeypatch):
    monkeypatch.delenv("REMP_ADMIN_TOKEN", raising=False)
    with RempClient(server.addr, token=token) as c:
        for call in (lambda: c.status(), lambda: list(c.reconfigure(1, 1))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # health and inference stay open
    with RempClient(server.addr, token=TOKEN) as c:
        assert c.status().switch_history == [] and c.status().topology == "TP1·PP1"


def test_cli_chat_generate_and_status_with_token(server, tmp_path):
    out = remp("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "24",
               "--addr", server.addr)
    assert out.returncode == 0 and "Paris" in out.stdout and "[stop" in out.stderr
    (tmp_path / "t").write_text(TOKEN)
    st = json.loads(remp("status", "--addr", server.addr, "--token-file", str(tmp_path / "t"), "--json").stdout)
    assert st["topology"] == "TP1·PP1"
    refused = remp("status", "--addr", server.addr)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr


def wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def fill(c: RempClient, prefix: str, prompt: list[int], max_new: int) -> list:
    """Three long streams: one running (max_num_seqs 1), two waiting (max_queue 2). The first must be
    running before the others arrive, else all three would wait at once and the third be refused.
    Returns the list each stream appends its last finish_reason to."""
    finished: list = []
    wait_until(lambda: (c.status().running_requests, c.status().queue_depth) == (0, 0))  # earlier requests gone

    def run(i):
        last = None
        for chunk in c.stream(prompt, request_id=f"{prefix}{i}", max_new_tokens=max_new, ignore_eos=True):
            last = chunk
        finished.append(last.finish_reason)

    for i in range(3):
        threading.Thread(target=run, args=(i,), daemon=True).start()
        if i == 0:
            wait_until(lambda: c.status().running_requests == 1)
    wait_until(lambda: (c.status().running_requests, c.status().queue_depth) == (1, 2))
    return finished


@pytest.fixture(scope="module")
def france(smol_mg, smol_hf):
    """The tokenizer, the France chat prompt's ids and HF's greedy continuation (it ends at EOS)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_mg))
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return tok, ids, smol_hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()


def test_stop_conditions_and_text_equal_hf(server, france):
    """End of text, a stop token id and length in the engine; the text and stop strings in the front end."""
    tok, ids, ref = france
    text = tok.decode(ref, skip_special_tokens=True)
    assert ref[-1] == tok.eos_token_id and len(ref) < 24 and "Paris" in text  # HF stops at EOS too
    with RempClient(server.addr, token=TOKEN) as c:
        eos = c.generate(ids, max_new_tokens=40)
        assert (list(eos.token_ids), eos.finish_reason, eos.text) == (ref, "stop", text)
        stop_id = c.generate(ids, max_new_tokens=40, stop_token_ids=[ref[3]])
        assert (list(stop_id.token_ids), stop_id.finish_reason) == (ref[:4], "stop")
        length = c.generate(ids, max_new_tokens=3)
        assert (list(length.token_ids), length.finish_reason) == (ref[:3], "length")
        cut = c.generate(ids, max_new_tokens=40, stop=["Paris"])
        assert (cut.finish_reason, cut.text) == ("stop", text.split("Paris")[0])
        assert "Paris" in tok.decode(cut.token_ids) and "Paris" not in tok.decode(cut.token_ids[:-1])


def test_detokenizer_streams_hf_text_token_by_token(france):
    """Token by token, the front end's text adds up to HF's decode."""
    from server.detokenizer import Detokenizer

    tok, _, ref = france
    d = Detokenizer(tok, [])
    assert "".join(d.add([t], i == len(ref) - 1)[0] for i, t in enumerate(ref)) == tok.decode(
        ref, skip_special_tokens=True)


def test_incremental_detokenizer_equals_whole_decode(smol_mg):
    """The decode window gives the same text as decoding the whole output, in chunks of 1-3 tokens
    as the link delivers them: SmolLM2's byte-level BPE on random ids, a third of them bytes of a
    multi-byte character (held back until completed), special tokens included; and a
    SentencePiece-style tokenizer, whose tokens decode alone without their leading space."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from server.detokenizer import Detokenizer

    def streamed(tok, ids: list[int]) -> str:
        d, text, i = Detokenizer(tok, []), "", 0
        while i < len(ids):
            chunk = ids[i:i + rng.choice([1, 1, 2, 3])]
            i += len(chunk)
            text += d.add(chunk, i == len(ids))[0]
        return text

    rng = random.Random(0)
    smol = AutoTokenizer.from_pretrained(str(smol_mg))
    partial = [i for i in range(len(smol)) if smol.decode([i]).endswith("\ufffd")]
    assert len(partial) > 50  # byte-level BPE: the bytes of multi-byte characters are tokens
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "\u2581hello", "\u2581world", "b"])},
                                       unk_token="<unk>"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    spiece = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    assert spiece.decode([1, 2]) == "hello world" and spiece.decode([2]) == "world"
    for _ in range(200):
        ids = [rng.choice(partial) if rng.random() < 0.3 else rng.randrange(len(smol)) for _ in range(rng.randrange(1, 120))]
        assert streamed(smol, ids) == smol.decode(ids, skip_special_tokens=True), ids
        ids = [rng.randrange(1, 4) for _ in range(rng.randrange(1, 20))]
        assert streamed(spiece, ids) == spiece.decode(ids, skip_special_tokens=True), ids


def test_no_part_of_a_stop_string_split_across_tokens_is_sent(smol_mg):
    from transformers import AutoTokenizer

    from server.detokenizer import Detokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_mg))
    ids = tok.encode("hello world, this is fine")
    assert tok.decode(ids[:1]) == "hello"  # the stop string "o wor" spans the first two tokens
    d = Detokenizer(tok, ["o wor", "zz"])
    sent = [d.add([t], False) for t in ids[:3]]
    assert sent[:2] == [("hell", False), ("", True)]


def test_full_admission_queue_is_resource_exhausted(server):
    with RempClient(server.addr, token=TOKEN) as c:
        fill(c, "long", [1, 2, 3, 4], 1000)
        with pytest.raises(grpc.RpcError) as e:
            c.generate([5, 6], max_new_tokens=1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        r = httpx.post(server.http_url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 1}, timeout=30)
        assert r.status_code == 429 and "admission queue full" in r.json()["error"]["message"]
        assert all(c.cancel(f"long{i}") for i in range(3))
        assert c.generate([5, 6], max_new_tokens=1).finish_reason == "length"  # serving again


def test_beyond_loopback_without_token_does_not_start(smol_mg, monkeypatch):
    monkeypatch.delenv("REMP_ADMIN_TOKEN", raising=False)
    out = remp("serve", "--model", str(smol_mg), "--nproc", "1", "--host", "0.0.0.0")
    assert out.returncode != 0 and "needs an admin token" in out.stderr


def test_sigterm_answers_every_request_and_exits_cleanly(server):
    with RempClient(server.addr, token=TOKEN) as c:
        results = fill(c, "t", [7, 8, 9], 800)
        server.proc.send_signal(signal.SIGTERM)
        # During the grace period: new work is refused with 503 (HTTP) / UNAVAILABLE (gRPC), health says so.
        wait_until(lambda: httpx.get(server.http_url + "/health", timeout=10).status_code == 503, 30)
        r = httpx.post(server.http_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as e:
            c.generate([5, 6], max_new_tokens=1)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.stop() == 0
        wait_until(lambda: len(results) == 3)
    assert sorted(results) == ["aborted"] * 3  # every stream got a final chunk with a status
    log = server.log_path.read_text()
    assert "rank 0 exited cleanly" in log
