"""`remp`: serve a model, talk to a server.

    remp serve --model runs/smollm2 --nproc 3 --tp 3 --pp 1 [--port 50051] [-- TORCHRUN FLAGS]
    remp join --link tcp://HEAD:PORT --nproc 2 -- --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HEAD:29400
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
import sys
import typing
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from pydantic import ValidationError

from remp_megatron.quiet import quiet_third_party

from .api import TOKEN_ENV

if typing.TYPE_CHECKING:
    from .config import ServerConfig

# `remp serve` flags: ServerConfig field ("engine."/"policy." for its nested configs) -> flag. Each flag's type,
# default and help come from the field, so a default lives only in the config models.
SERVE_FLAGS = {
    "model": "--model", "tp": "--tp", "pp": "--pp", "ep": "--ep", "host": "--host", "port": "--port", "http_port": "--http-port",
    "served_model_name": "--served-model-name",
    "metrics_port": "--metrics-port", "admin_token_file": "--admin-token-file", "tls_cert": "--tls-cert",
    "tls_key": "--tls-key", "max_prompt_tokens": "--max-prompt-tokens", "max_new_tokens": "--max-new-tokens",
    "shutdown_grace_s": "--shutdown-grace", "max_restarts": "--max-restarts", "link_port": "--link-port",
    "engine.kv_budget_mb": "--kv-budget-mb", "engine.max_num_seqs": "--max-num-seqs",
    "engine.max_tokens_per_step": "--max-tokens-per-step",
    "engine.max_queue": "--max-queue", "engine.block_size": "--block-size",
    "engine.prestage_budget_mb": "--prestage-budget-mb", "engine.dtype": "--dtype",
    "policy_profile": "--policy-profile", "policy_enabled": "--policy", "policy.interval_s": "--policy-interval",
    "policy.low_load": "--policy-low", "policy.high_load": "--policy-high", "policy.patience": "--policy-patience",
    "policy.min_dwell_s": "--policy-min-dwell",
}


def _client(args):
    from .client import RempClient

    token = args.token
    if token is None and args.token_file:
        token = Path(args.token_file).read_text().strip()
    return RempClient(args.addr, token=token, root_cert=args.tls_ca)


def _emit(args, msg, text: str) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)) if args.json else text, flush=True)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SERVE_FLAGS entry; a flag not given is left out, so the model's default applies."""
    from .config import ServerConfig

    for path, flag in SERVE_FLAGS.items():
        *sections, name = path.split(".")
        model = ServerConfig
        for section in sections:
            model = model.model_fields[section].annotation
        field = model.model_fields[name]
        kw = dict(dest=path, default=argparse.SUPPRESS, help=field.description)
        if field.annotation is bool:
            parser.add_argument(flag, action="store_true", **kw)
            continue
        if field.default is not None and not field.is_required():
            kw["help"] += f" (default: {field.default})"
        value_type = next(t for t in typing.get_args(field.annotation) or (field.annotation,)
                          if t is not type(None))  # Optional[X] -> X
        if typing.get_origin(value_type) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(value_type), required=field.is_required(), **kw)
            continue
        parser.add_argument(flag, type=value_type, required=field.is_required(),
                            metavar=flag[2:].upper().replace("-", "_"), **kw)


def serve_config(args) -> ServerConfig:
    """The ServerConfig that `remp serve`'s flags describe."""
    from .config import ServerConfig

    values: dict = {}
    for path in SERVE_FLAGS.keys() & vars(args).keys():
        section, _, name = path.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = getattr(args, path)
    values["model"] = values["model"].resolve()
    return ServerConfig.model_validate(values)


def cmd_serve(args) -> int:
    from remp_megatron.policy import CostProfile

    try:
        cfg = serve_config(args)
        cfg.admin_token()  # refuse to start beyond loopback without a token
        profile = CostProfile.load(cfg.policy_profile) if cfg.policy_profile is not None else None
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(map(str, err["loc"]))
            print(f"remp: error: {SERVE_FLAGS.get(where, where)}: {err['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"remp: error: {e}", file=sys.stderr)
        return 2
    from .serve import serve

    return serve(cfg, args.nproc, args.torchrun or ["--standalone"], args.port_file, args.allow_fault_injection,
                 profile)


def cmd_join(args) -> int:
    from .config import ServerConfig
    from .serve import join

    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else os.environ.get(TOKEN_ENV)
    if not token:
        print(f"remp: error: joining needs the server's admin token (--admin-token-file or ${TOKEN_ENV})",
              file=sys.stderr)
        return 2
    restarts = args.max_restarts if args.max_restarts is not None else ServerConfig.model_fields["max_restarts"].default
    return join(args.link, token, args.nproc, restarts, args.torchrun)


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
    from .api import describe_switch, pb

    code = 0
    with _client(args) as c:
        for ev in c.reconfigure(args.tp, args.pp, args.mode, ep=args.ep):
            kind = pb.ReconfigureEvent.Kind.Name(ev.kind)
            if kind == "PHASE":
                text = f"  {ev.phase:<13s} {ev.seconds * 1e3:8.1f} ms" + (f"  {ev.bytes / 2**20:.1f} MiB" if ev.bytes else "")
            elif kind == "STAGING":
                text = (f"  staging {ev.bytes / 2**20:.0f} of {ev.bytes_total / 2**20:.0f} MiB while serving "
                        f"({ev.seconds:.1f} s)" if not ev.reason else f"  staging refused: {ev.reason}")
            elif kind == "ACCEPTED":
                text = f"accepted: {ev.source} -> {ev.target}"
            else:
                text = (f"{kind.lower()}: {ev.source} -> {ev.target}, {describe_switch(ev)}"
                        + (f" ({ev.reason})" if ev.reason else ""))
                code = 0 if kind == "COMMITTED" else 3
            _emit(args, ev, text)
    return code


def cmd_status(args) -> int:
    from .api import describe_switch

    with _client(args) as c:
        st = c.status()
    text = (f"topology {st.topology}  {st.dtype}  world {st.world_size}  active {list(st.active_ranks)}  standby "
            f"{list(st.standby_ranks)}\nqueue {st.queue_depth}  running {st.running_requests}  KV blocks used "
            f"{st.kv_blocks_used} free {st.kv_blocks_free} (block {st.kv_block_size})\nswitches: "
            + ("none" if not st.switch_history else "".join(
                f"\n  {s.source} -> {s.target} ({s.mode}) {'committed' if s.committed else 'rolled back'}: "
                f"{describe_switch(s)}" for s in st.switch_history))
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
    quiet_third_party()
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="remp", description="ReMP-Megatron server and client")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_opts(sp):
        sp.add_argument("--addr", default="127.0.0.1:50051")
        sp.add_argument("--token", help="admin token (default: $REMP_ADMIN_TOKEN)")
        sp.add_argument("--token-file")
        sp.add_argument("--tls-ca", help="PEM root certificate for a TLS server")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("serve", help="launch the server under torchrun")
    s.add_argument("--nproc", type=int, required=True, help="ranks on this node (torchrun --nproc-per-node)")
    s.add_argument("--port-file", help="write the bound port here once serving")
    if argv[:1] == ["serve"]:  # the config models import torch: only `remp serve` pays for that
        add_config_flags(s)
    s.add_argument("--allow-fault-injection", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("torchrun", nargs=argparse.REMAINDER, help="after --: torchrun flags (multi-node etc.)")
    s.set_defaults(fn=cmd_serve)

    j = sub.add_parser("join", help="run this node's ranks of a multi-node server (its front end runs `remp serve`)")
    j.add_argument("--link", required=True, help="the front end's link, tcp://HOST:PORT (`remp serve --link-port`)")
    j.add_argument("--nproc", type=int, required=True, help="ranks on this node (torchrun --nproc-per-node)")
    j.add_argument("--admin-token-file", help=f"file with the server's admin token (else ${TOKEN_ENV})")
    j.add_argument("--max-restarts", type=int, help="as the server's --max-restarts (default: its default)")
    j.add_argument("torchrun", nargs=argparse.REMAINDER, help="after --: torchrun flags (--nnodes, --rdzv-*)")
    j.set_defaults(fn=cmd_join)

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
    r.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models; must divide --tp)")
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
