"""`remp`: serve a model, talk to a server.

    remp serve --model runs/smollm2 --nproc 3 --tp 3 --pp 1 [--port 50051] [-- TORCHRUN FLAGS]
    remp generate "What is the capital of France?" [--chat] [--max-new-tokens 64] [--json]
    remp reconfigure --tp 1 --pp 3 [--mode migrate|recompute|drain] [--json]
    remp status [--json]
    remp policy on|off
    remp health [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict


def _client(args):
    from .client import RempClient

    token = args.token
    if token is None and args.token_file:
        token = Path(args.token_file).read_text().strip()
    return RempClient(args.addr, token=token, root_cert=args.tls_ca)


def _emit(args, msg, text: str) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)) if args.json else text, flush=True)


def cmd_serve(args) -> int:
    from remp_megatron.engine import EngineConfig
    from remp_megatron.policy import PolicyConfig

    from .config import ServerConfig

    cfg = ServerConfig(
        model=Path(args.model).resolve(), tp=args.tp, pp=args.pp, host=args.host, port=args.port,
        metrics_port=args.metrics_port, admin_token_file=args.admin_token_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        shutdown_grace_s=args.shutdown_grace, policy_profile=args.policy_profile, policy_enabled=args.policy,
        policy=PolicyConfig(interval_s=args.policy_interval, low_load=args.policy_low, high_load=args.policy_high,
                            patience=args.policy_patience, min_dwell_s=args.policy_min_dwell),
        engine=EngineConfig(kv_budget_mb=args.kv_budget_mb, max_num_seqs=args.max_num_seqs,
                            max_queue=args.max_queue, block_size=args.block_size))
    cfg.admin_token()  # refuse to start beyond loopback without a token
    torchrun_flags = args.torchrun or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", *torchrun_flags,
           "-m", "server.main", "--config-json", cfg.model_dump_json()]
    if args.port_file:
        cmd += ["--port-file", args.port_file]
    if args.allow_fault_injection:
        cmd.append("--allow-fault-injection")
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopping = []

    def forward(sig, _frame):  # rank 0 drains and releases the others; torchrun relays to all
        stopping.append(sig)
        os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    # torchrun reports the signal it relayed as a failure; the ranks themselves exited cleanly.
    return 0 if stopping and code in (0, 1, -signal.SIGTERM, 128 + signal.SIGTERM) else code


def cmd_generate(args) -> int:
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    params = {"max_new_tokens": args.max_new_tokens}
    for k in ("temperature", "top_k", "top_p", "seed"):
        if getattr(args, k) is not None:
            params[k] = getattr(args, k)
    with _client(args) as c:
        for chunk in c.stream(prompt, stop=args.stop, **params):
            if args.json:
                _emit(args, chunk, "")
            else:
                print(chunk.text, end="", flush=True)
                if chunk.finished:
                    print(f"\n[{chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]", file=sys.stderr)
    return 0


def cmd_reconfigure(args) -> int:
    from .api import pb

    code = 0
    with _client(args) as c:
        for ev in c.reconfigure(args.tp, args.pp, args.mode):
            kind = pb.ReconfigureEvent.Kind.Name(ev.kind)
            if kind == "PHASE":
                text = f"  {ev.phase:<13s} {ev.seconds * 1e3:8.1f} ms" + (f"  {ev.bytes / 2**20:.1f} MiB" if ev.bytes else "")
            elif kind == "ACCEPTED":
                text = f"accepted: {ev.source} -> {ev.target}"
            else:
                text = (f"{kind.lower()}: {ev.source} -> {ev.target}, downtime {ev.downtime_s * 1e3:.0f} ms"
                        + (f" ({ev.reason})" if ev.reason else ""))
                code = 0 if kind == "COMMITTED" else 3
            _emit(args, ev, text)
    return code


def cmd_status(args) -> int:
    with _client(args) as c:
        st = c.status()
    text = (f"topology {st.topology}  world {st.world_size}  active {list(st.active_ranks)}  standby "
            f"{list(st.standby_ranks)}\nqueue {st.queue_depth}  running {st.running_requests}  KV blocks used "
            f"{st.kv_blocks_used} free {st.kv_blocks_free} (block {st.kv_block_size})\nswitches: "
            + ("none" if not st.switch_history else "".join(
                f"\n  {s.source} -> {s.target} ({s.mode}) {'committed' if s.committed else 'rolled back'} "
                f"{s.downtime_s * 1e3:.0f} ms" for s in st.switch_history))
            + (f"\npolicy: {'on' if st.policy.enabled else 'off'}" + "".join(
                f"\n  t={d.time_s:.0f}s {d.current} wants {d.wanted}: {d.reason}" for d in st.policy.decisions[-5:])
               if st.HasField("policy") else ""))
    _emit(args, st, text)
    return 0


def cmd_policy(args) -> int:
    with _client(args) as c:
        st = c.set_policy(args.state == "on")
    _emit(args, st, f"policy {'on' if st.enabled else 'off'}: latency-optimal {st.latency_best}, "
                    f"throughput-optimal {st.throughput_best}")
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        status = c.health()
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="remp", description="ReMP-Megatron server and client")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_opts(sp):
        sp.add_argument("--addr", default="127.0.0.1:50051")
        sp.add_argument("--token", help="admin token (default: $REMP_ADMIN_TOKEN)")
        sp.add_argument("--token-file")
        sp.add_argument("--tls-ca", help="PEM root certificate for a TLS server")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("serve", help="launch the server under torchrun")
    s.add_argument("--model", required=True)
    s.add_argument("--nproc", type=int, required=True, help="ranks on this node (torchrun --nproc-per-node)")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--port-file")
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--admin-token-file")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--max-prompt-tokens", type=int, default=4096)
    s.add_argument("--max-new-tokens", type=int, default=1024)
    s.add_argument("--kv-budget-mb", type=float, default=64)
    s.add_argument("--max-num-seqs", type=int, default=32)
    s.add_argument("--max-queue", type=int, default=256)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--shutdown-grace", type=float, default=10.0)
    s.add_argument("--policy-profile", help="cost profile JSON for the adaptive policy (bench_engine.py --profile-out)")
    s.add_argument("--policy", action="store_true", help="start with the adaptive policy on")
    s.add_argument("--policy-interval", type=float, default=1.0)
    s.add_argument("--policy-low", type=float, default=1.0, help="load at or below: latency-optimal topology")
    s.add_argument("--policy-high", type=float, default=6.0, help="load at or above: throughput-optimal topology")
    s.add_argument("--policy-patience", type=int, default=3)
    s.add_argument("--policy-min-dwell", type=float, default=15.0)
    s.add_argument("--allow-fault-injection", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("torchrun", nargs=argparse.REMAINDER, help="after --: torchrun flags (multi-node etc.)")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="stream a completion")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send as a user chat message")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[])
    client_opts(g)
    g.set_defaults(fn=cmd_generate)

    r = sub.add_parser("reconfigure", help="switch TP×PP live")
    r.add_argument("--tp", type=int, required=True)
    r.add_argument("--pp", type=int, required=True)
    r.add_argument("--mode", default="migrate", choices=["migrate", "recompute", "drain"])
    client_opts(r)
    r.set_defaults(fn=cmd_reconfigure)

    po = sub.add_parser("policy", help="turn the adaptive topology policy on or off")
    po.add_argument("state", choices=["on", "off"])
    client_opts(po)
    po.set_defaults(fn=cmd_policy)

    for name, fn, help_ in (("status", cmd_status, "topology, queue, KV, switch history"),
                            ("health", cmd_health, "gRPC health check")):
        sp = sub.add_parser(name, help=help_)
        client_opts(sp)
        sp.set_defaults(fn=fn)

    args = p.parse_args(argv)
    if getattr(args, "torchrun", None) and args.torchrun[0] == "--":
        args.torchrun = args.torchrun[1:]
    try:
        return args.fn(args)
    except grpc.RpcError as e:
        print(f"remp: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
