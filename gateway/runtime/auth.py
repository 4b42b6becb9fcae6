"""Who is calling: admin tokens and tenant API keys, compared in constant time.

Credentials arrive as `authorization: Bearer <secret>` metadata. Every
configured secret is compared (no early exit, equal-length digests) so timing
does not reveal which prefix matched. Secrets are never logged: principals
carry names only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.runtime.config import Config

__all__ = ["Credentials", "Principal", "Role", "bearer_token"]


class Role(enum.Enum):
    """What a credential may do."""

    ADMIN = "admin"  # admin RPCs and checks
    TENANT = "tenant"  # checks, under the tenant's policies
    ANONYMOUS = "anonymous"  # no credential


@dataclass(frozen=True, slots=True)
class Principal:
    """An identified caller.

    Attributes:
        role: ADMIN, TENANT or ANONYMOUS.
        name: The admin token's or tenant's name ("" when anonymous).
        policy: The tenant's default policy (tenants only).
        allowed_policies: Policies a tenant may name (tenants only).
    """

    role: Role
    name: str = ""
    policy: str = ""
    allowed_policies: tuple[str, ...] = ()


ANONYMOUS = Principal(Role.ANONYMOUS)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class Credentials:
    """The admin tokens and tenant keys of one configuration."""

    def __init__(self, config: Config) -> None:
        entries: list[tuple[bytes, Principal]] = [
            (_digest(token), Principal(Role.ADMIN, name))
            for name, token in config.admin_tokens.items()
        ]
        for tenant in config.tenants.values():
            principal = Principal(Role.TENANT, tenant.name, tenant.policy, tenant.allowed_policies)
            entries += [(_digest(key), principal) for key in tenant.api_keys]
        self._entries = entries

    def identify(self, secret: str | None) -> Principal | None:
        """The principal of `secret`; ANONYMOUS when absent, None when unknown."""
        if not secret:
            return ANONYMOUS
        presented = _digest(secret)
        found: Principal | None = None
        for digest, principal in self._entries:  # no early exit: constant time
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The secret of an `authorization: Bearer <secret>` entry, or None."""
    value = metadata.get("authorization", "")
    scheme, _, secret = value.partition(" ")
    return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None
