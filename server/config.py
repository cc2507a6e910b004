"""Server configuration (pydantic): the front end's, also passed to every rank."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from remp_megatron.config import EngineConfig
from remp_megatron.policy import PolicyConfig

from .api import TOKEN_ENV


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="converted model directory (remp-convert import)")
    tp: int = Field(1, ge=1, description="tensor-parallel size to start at")
    pp: int = Field(1, ge=1, description="pipeline-parallel size to start at")
    ep: int = Field(1, ge=1, description="expert-parallel size to start at (MoE models; must divide tp)")
    host: str = Field("127.0.0.1", description="address to listen on; beyond loopback needs an admin token")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    http_port: Optional[int] = Field(None, ge=0, le=65535,
                                     description="OpenAI-compatible HTTP API port (0: any free port; default: off)")
    served_model_name: Optional[str] = Field(None, min_length=1,
                                             description="model id in the HTTP API (default: the model directory's name)")
    metrics_port: Optional[int] = Field(None, ge=0, le=65535, description="Prometheus metrics port (0: any free)")
    admin_token_file: Optional[Path] = Field(None, description=f"file with the Admin RPC token (else ${TOKEN_ENV})")
    tls_cert: Optional[Path] = Field(None, description="PEM certificate chain: serve over TLS")
    tls_key: Optional[Path] = Field(None, description="PEM private key of the TLS certificate")
    max_prompt_tokens: int = Field(4096, ge=1, description="longest prompt accepted, in tokens")
    max_new_tokens: int = Field(1024, ge=1, description="most new tokens a request may ask for")
    max_message_bytes: int = Field(4 * 2**20, ge=1024, description="largest gRPC message")
    shutdown_grace_s: float = Field(10.0, ge=0, description="seconds running requests get to finish on SIGTERM")
    link_port: int = Field(0, ge=0, le=65535, description="port of the front end's link to the engine's rank 0, on "
                           "--host (0: any free port; fix it for ranks on other nodes: `remp join`)")
    max_restarts: int = Field(3, ge=0, description="times torchrun re-forms the engine's world after a rank is lost "
                              "(requests wait meanwhile); then they fail UNAVAILABLE")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    policy_profile: Optional[Path] = Field(
        None, description="cost profile JSON for the adaptive policy (bench_engine.py --profile-out)")
    policy_enabled: bool = Field(False, description="start with the adaptive policy on (else `remp policy on`)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def admin_token(self) -> Optional[str]:
        """From the token file, else $REMP_ADMIN_TOKEN; required when listening beyond loopback."""
        token = None
        if self.admin_token_file is not None:
            token = self.admin_token_file.read_text().strip()
        token = token or os.environ.get(TOKEN_ENV) or None
        if token is None and not self.loopback_only:
            raise ValueError(f"listening on {self.host} (beyond loopback) needs an admin token: "
                             f"--admin-token-file or ${TOKEN_ENV}")
        return token
