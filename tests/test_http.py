"""The OpenAI-compatible HTTP API, driven by the official `openai` client over loopback against a
2-rank SmolLM2 server (TP1·PP2): greedy text equal to HF transformers, usage counts, streams that
survive live switches made over HTTP admin, every error status with a message naming the problem,
disconnects that free KV blocks; and the DeepSpeed-MII-style Python API (client, serve, pipeline)."""
import json
import sys
import threading

import httpx2 as httpx  # the openai client's own HTTP library
import openai
import pytest

from conftest import ROOT, Server, run
from remp_megatron.hf_reference import CLEAR_MARGIN, hf_greedy

pytestmark = pytest.mark.world
TOKEN = "http-admin-token"
MODEL = "smol"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Prompts whose greedy continuations have a clear top-2 margin (checked against HF below).
TEXTS = ["def fibonacci(n):", "The largest planet in the solar system is", "The capital of France is",
         "In 1492, Columbus", "Once upon a time, there was a"]
CHATS = ["What is the capital of France?", "Name three fruits.", "What is 2+2?"]
MAX_NEW = 20


@pytest.fixture(scope="module")
def server(smol_mg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-server")
    (tmp / "token").write_text(TOKEN)
    s = Server(tmp, smol_mg, 2, 1, 2, "--http-port", "0", "--served-model-name", MODEL, "--admin-token-file",
               str(tmp / "token"), "--max-new-tokens", "1000", "--max-prompt-tokens", "200")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tok(smol_mg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_mg))


def reference(smol_hf, tok, ids: list[int]) -> tuple[str, str, int]:
    """HF's greedy (text, finish_reason, completion tokens) for MAX_NEW tokens, stopping at EOS."""
    out, margin = hf_greedy(smol_hf, ids, MAX_NEW, eos=tok.eos_token_id)
    assert margin > CLEAR_MARGIN, f"prompt {tok.decode(ids)!r} has a greedy near-tie: pick another"
    return tok.decode(out, skip_special_tokens=True), "stop" if out[-1] == tok.eos_token_id else "length", len(out)


def chat_ids(tok, q: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def text_refs(smol_hf, tok):
    return [reference(smol_hf, tok, tok.encode(t, add_special_tokens=False)) for t in TEXTS]


def admin_status(server) -> dict:
    return httpx.get(server.http_url + "/admin/status", headers=AUTH, timeout=30).json()


def test_models_and_health(server):
    models = httpx.get(server.http_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 8192
    assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}


def test_batched_text_completion_equals_hf_with_usage(oai, tok, text_refs):
    r = oai.completions.create(model=MODEL, prompt=TEXTS, max_tokens=MAX_NEW, temperature=0)
    assert [c.index for c in r.choices] == list(range(len(TEXTS)))
    assert [(c.text, c.finish_reason) for c in r.choices] == [(text, reason) for text, reason, _ in text_refs]
    assert r.usage.prompt_tokens == sum(len(tok.encode(t, add_special_tokens=False)) for t in TEXTS)
    assert r.usage.completion_tokens == sum(n for *_, n in text_refs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_hf_with_the_models_template(oai, tok, smol_hf):
    for q in CHATS:
        text, reason, n = reference(smol_hf, tok, chat_ids(tok, q))
        chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                  max_tokens=MAX_NEW, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(chat_ids(tok, q))
        assert chunks[-1].usage.completion_tokens == n
    whole = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                        max_tokens=MAX_NEW, temperature=0)  # the last one, not streamed
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, reason)
    assert whole.usage.completion_tokens == n


def reconfigure(server, tp: int, pp: int, headers=AUTH) -> list[dict]:
    with httpx.stream("POST", server.http_url + "/admin/reconfigure", json={"tp": tp, "pp": pp, "mode": "migrate"},
                      headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def test_concurrent_streams_survive_live_switches_made_over_http(server, oai, text_refs):
    results = [None] * len(TEXTS)

    def stream(i):
        chunks = list(oai.completions.create(model=MODEL, prompt=TEXTS[i], max_tokens=MAX_NEW, temperature=0,
                                             stream=True))
        results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    outcomes = []
    for tp, pp in ((1, 1), (1, 2)):
        events = reconfigure(server, tp, pp)
        assert events[0]["kind"] == "ACCEPTED" and [e["phase"] for e in events if e["kind"] == "PHASE"][-1] == "commit"
        outcomes.append(events[-1]["kind"])
    for t in threads:
        t.join(timeout=300)
    assert outcomes == ["COMMITTED", "COMMITTED"]
    assert results == [(text, reason) for text, reason, _ in text_refs]
    st = admin_status(server)
    assert st["topology"] == "TP1·PP2" and sum(s["committed"] for s in st["switch_history"]) == 2


BAD = [  # (path, body, status, param, words in the message)
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "not supported"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "exceeds the server limit of 1000"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "temprature": 0}, 400, "temprature", "Extra inputs"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "a string, a list of token ids"),
    ("/v1/completions", {"prompt": [1] * 201}, 400, "prompt", "201 tokens exceeds the server limit of 200"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content", "only text parts are supported, not 'image_url'"),
    ("/admin/reconfigure", {"tp": 2, "pp": 1}, 400, "tp", "must divide num_attention_heads=9"),
    ("/admin/reconfigure", {"tp": 1, "pp": 1, "mode": "teleport"}, 400, "mode", "'teleport'"),
    ("/admin/reconfigure", {"tp": 1, "pp": 1, "ep": 2}, 400, "ep", "needs a mixture-of-experts model"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{b[3]}-{b[2]}" for b in BAD])
def test_bad_requests_get_openai_errors_naming_the_problem(server, path, body, status, param, words):
    before = admin_status(server)
    r = httpx.post(server.http_url + path, json=body, headers=AUTH, timeout=60)
    err = r.json()["error"]
    assert r.status_code == status and err["code"] == status and err["param"] == param, err
    assert words in err["message"] and err["type"], err
    after = admin_status(server)
    assert (after["topology"], len(after["switch_history"])) == (before["topology"], len(before["switch_history"]))


def test_malformed_json_unknown_route_and_admin_without_token(server, oai):
    r = httpx.post(server.http_url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(server.http_url + "/v1/nothing-here").status_code == 404
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(server.http_url + "/admin/status", headers=headers).status_code == 401
        r = httpx.post(server.http_url + "/admin/reconfigure", json={"tp": 1, "pp": 1}, headers=headers)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert admin_status(server)["topology"] == "TP1·PP2"
    with pytest.raises(openai.NotFoundError):  # the client raises the typed error for our 404
        oai.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert oai.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_client_that_goes_away_cancels_and_frees_kv_blocks(server, oai):
    """1000 tokens take well over 10 s here; a cancelled request is gone at the next step boundary."""
    def idle():
        st = admin_status(server)
        return (st["running_requests"], st["kv_blocks_used"]) == (0, 0)

    stream = oai.completions.create(model=MODEL, prompt="Tell me a story", max_tokens=1000, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))
    # Load in the status is the engine core's last heartbeat (every 0.2 s).
    wait_for(lambda: (st := admin_status(server))["running_requests"] == 1 and st["kv_blocks_used"] > 0, timeout=10)
    stream.close()
    wait_for(idle, timeout=5)
    # Not streamed: the client times out and closes the connection while the server generates.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.http_url + "/v1/completions", timeout=httpx.Timeout(30, read=1.5),
                   json={"prompt": "Tell me a story", "max_tokens": 1000, "ignore_eos": True})
    wait_for(idle, timeout=5)


def wait_for(cond, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_prometheus_metrics_over_http(server):
    body = httpx.get(server.http_url + "/metrics").text
    values = {name: float(v) for name, _, v in (line.rpartition(" ") for line in body.splitlines()
                                                 if line and not line.startswith("#"))}
    # Earlier tests in this module finished requests and switched twice.
    assert values['remp_requests_total{finish_reason="length"}'] >= len(TEXTS)
    assert values['remp_switches_total{outcome="committed"}'] >= 2


def test_mii_style_client_against_the_live_server(server, oai, text_refs):
    import remp_megatron

    with remp_megatron.client(server.addr, token=TOKEN) as c:
        out = c.generate(TEXTS[:2], max_new_tokens=MAX_NEW)
        assert [(r.text, r.finish_reason) for r in out] == [(t, f) for t, f, _ in text_refs[:2]]
        # Sampling parameters reach the engine the same way over HTTP: seeded sampling, same text as gRPC.
        sampled = dict(temperature=0.9, top_p=0.95, top_k=40, seed=7)
        grpc_text = c.generate(TEXTS[4], max_new_tokens=MAX_NEW, **sampled)[0].text
        http = oai.completions.create(model=MODEL, prompt=TEXTS[4], max_tokens=MAX_NEW, temperature=0.9, top_p=0.95,
                                      seed=7, extra_body={"top_k": 40})
        assert http.choices[0].text == grpc_text != text_refs[4][0]  # and not the greedy text
        assert "".join(r.text for r in c.stream(TEXTS[0], max_new_tokens=MAX_NEW)) == text_refs[0][0]
        assert c.reconfigure(1, 1).committed and c.status().topology == "TP1·PP1"  # the module's last switch


def test_mii_style_serve_generate_reconfigure_terminate(llama_mg, tmp_path):
    import remp_megatron

    c = remp_megatron.serve(llama_mg, tp=1, pp=2, workdir=tmp_path, max_new_tokens=64)
    before = c.generate([[5, 6, 7], [9, 10, 11, 12]], max_new_tokens=8)
    assert [r.generated_length for r in before] == [8, 8] and before[0].prompt_length == 3
    switched = c.reconfigure(2, 1)
    assert switched.committed and switched.target == "TP2·PP1" and "move_weights" in switched.phases
    assert switched.staging_s > 0 and 0 < switched.pause_s <= switched.downtime_s  # staged while serving
    assert c.generate([[5, 6, 7], [9, 10, 11, 12]], max_new_tokens=8) == before
    c.terminate_server()
    assert c.server.proc.returncode == 0 and "rank 0 exited cleanly" in c.server.log_path.read_text()


def test_mii_style_pipeline_serves_in_process(llama_mg):
    """The script calls pipeline(tp=1, pp=2) (its process is rank 0; rank 1 a child), generates,
    switches to TP2·PP1, generates again and prints both."""
    script = ("import json, sys, remp_megatron\n"
              "with remp_megatron.pipeline(sys.argv[1], tp=1, pp=2) as pipe:\n"
              "    a = pipe([[5, 6, 7], [9, 10, 11, 12]], max_new_tokens=8)\n"
              "    s = pipe.reconfigure(2, 1)\n"
              "    b = pipe([[5, 6, 7], [9, 10, 11, 12]], max_new_tokens=8)\n"
              "print(json.dumps({'a': [r.token_ids for r in a], 'b': [r.token_ids for r in b], 'to': s.target}))\n")
    out = json.loads(run([sys.executable, "-c", script, str(llama_mg)], timeout=300, cwd=ROOT).stdout.splitlines()[-1])
    assert out["to"] == "TP2·PP1" and out["a"] == out["b"] and [len(t) for t in out["a"]] == [8, 8]
