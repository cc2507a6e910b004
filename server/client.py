"""Python client for a ReMP server."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .api import TOKEN_ENV, pb, pb_grpc

Prompt = Union[str, Sequence[int], Sequence[dict]]


def _prompt_fields(prompt: Prompt) -> dict:
    if isinstance(prompt, str):
        return {"text": prompt}
    items = list(prompt)
    if items and isinstance(items[0], dict):
        return {"chat": pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in items])}
    return {"token_ids": pb.TokenIds(ids=items)}


class RempClient:
    """``prompt`` is text, a list of token ids, or chat messages [{"role", "content"}]."""

    def __init__(self, addr: str = "127.0.0.1:50051", token: Optional[str] = None,
                 root_cert: Optional[Path] = None):
        if root_cert is not None:
            self.channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(Path(root_cert).read_bytes()))
        else:
            self.channel = grpc.insecure_channel(addr)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def build_request(self, prompt: Prompt, request_id: str = "", **params) -> pb.GenerateRequest:
        stop = params.pop("stop", [])
        stop_ids = params.pop("stop_token_ids", [])
        ignore_eos = params.pop("ignore_eos", False)
        return pb.GenerateRequest(request_id=request_id, params=pb.SamplingParams(
            stop=stop, stop_token_ids=stop_ids, ignore_eos=ignore_eos, **params), **_prompt_fields(prompt))

    def generate(self, prompt: Prompt, request_id: str = "", timeout: Optional[float] = None,
                 **params) -> pb.GenerateResponse:
        return self.inference.Generate(self.build_request(prompt, request_id, **params), timeout=timeout)

    def stream(self, prompt: Prompt, request_id: str = "", timeout: Optional[float] = None,
               **params) -> Iterator[pb.GenerateChunk]:
        return self.inference.GenerateStream(self.build_request(prompt, request_id, **params), timeout=timeout)

    def cancel(self, request_id: str) -> bool:
        return self.inference.Cancel(pb.CancelRequest(request_id=request_id)).cancelled

    def _admin_md(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    def reconfigure(self, tp: int, pp: int, mode: str = "migrate", inject_fault: str = "",
                    timeout: Optional[float] = None, ep: int = 1) -> Iterator[pb.ReconfigureEvent]:
        req = pb.ReconfigureRequest(tp=tp, pp=pp, ep=ep, mode=mode, inject_fault=inject_fault)
        return self.admin.Reconfigure(req, metadata=self._admin_md(), timeout=timeout)

    def status(self, timeout: Optional[float] = None) -> pb.StatusResponse:
        return self.admin.GetStatus(pb.StatusRequest(), metadata=self._admin_md(), timeout=timeout)

    def set_policy(self, enabled: bool, timeout: Optional[float] = None) -> pb.PolicyState:
        return self.admin.SetPolicy(pb.SetPolicyRequest(enabled=enabled), metadata=self._admin_md(), timeout=timeout)

    def shutdown(self, timeout: Optional[float] = 30) -> None:
        """Graceful shutdown of the server (returns at once; the server drains, then exits)."""
        self.admin.Shutdown(pb.ShutdownRequest(), metadata=self._admin_md(), timeout=timeout)

    def health(self, service: str = "", timeout: Optional[float] = 5) -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RempClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
