"""Server configuration (pydantic): what `remp serve` passes to every rank."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from remp_megatron.engine import EngineConfig
from remp_megatron.policy import PolicyConfig

from .api import TOKEN_ENV


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: Optional[int] = Field(None, ge=0, le=65535)
    admin_token_file: Optional[Path] = None
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_message_bytes: int = Field(4 * 2**20, ge=1024)
    shutdown_grace_s: float = Field(10.0, ge=0)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    policy_profile: Optional[Path] = None  # cost profile JSON (bench_engine.py --profile-out)
    policy_enabled: bool = False  # on at start (else via Admin.SetPolicy)

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
