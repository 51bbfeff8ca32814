"""Managed identities of the emulated VM and IMDS's identity concurrency limit (sans-IO).

:class:`Identities` is which identities the VM has: a system-assigned one (on by default) and
user-assigned ones, each with ``client_id``, ``object_id`` and ``msi_res_id``. A token request
selects one with ``client_id``, ``object_id``, ``msi_res_id`` or ``mi_res_id`` (the newer
name of ``msi_res_id``), or the system-assigned identity when it names none. A request naming
an identity the VM does not have (or without one when there is no system-assigned identity)
gets IMDS's ``400 {"error":"invalid_request","error_description":"Identity not found"}``.

:class:`IdentityGate` enforces "5 concurrent requests" on ``/metadata/identity``: the shell
calls :meth:`IdentityGate.enter` when such a request arrives and :meth:`IdentityGate.leave`
when it is answered; the sixth in flight is refused with 429. ``latency`` (seconds, 0 by
default) is how long the shell holds each admitted request before answering, standing in for
IMDS's token acquisition, so the limit can be reached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Final

IDENTITY_PREFIX: Final = "/metadata/identity"
SELECTORS: Final = ("client_id", "object_id", "msi_res_id", "mi_res_id")
NOT_FOUND: Final = {"error": "invalid_request", "error_description": "Identity not found"}
TOO_MANY: Final = {"error": "Too many requests"}
DEFAULT_CONCURRENCY: Final = 5
DEFAULT_USER_ASSIGNED: Final = {
    "client_id": "6d2f8a1c-3b4e-4f5a-9c7d-8e1f2a3b4c5d",
    "object_id": "0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f",
    "msi_res_id": "/subscriptions/xxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxx/resourceGroups/"
    "macikgo-test-may-23/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
    "examplevmidentity",
}


class IdentityConfigError(ValueError):
    """An identities document is malformed; ``status`` is 400."""

    status = 400


@dataclass(frozen=True)
class Identity:
    """One managed identity: its ids (``msi_res_id`` empty for the system-assigned one)."""

    client_id: str
    object_id: str
    msi_res_id: str = ""

    def matches(self, selector: str, value: str) -> bool:
        """True when ``selector=value`` names this identity (resource ids ignore case)."""
        if selector in ("msi_res_id", "mi_res_id"):
            return bool(self.msi_res_id) and self.msi_res_id.lower() == value.lower()
        own = {"client_id": self.client_id, "object_id": self.object_id}
        return own.get(selector) == value


class Identities:
    """The VM's managed identities (see the module docstring)."""

    def __init__(self, system: Identity | None, user_assigned: list[Identity]) -> None:
        self.system = system
        self.user_assigned = list(user_assigned)
        self._system_ids = system or Identity("", "")

    @classmethod
    def default(cls, vm_id: str) -> Identities:
        """A system-assigned identity (ids = ``vm_id``) and one user-assigned identity."""
        return cls(Identity(vm_id, vm_id), [Identity(**DEFAULT_USER_ASSIGNED)])

    def select(self, query: dict[str, str]) -> Identity | None:
        """The identity a token request's query names, None when the VM has no such one."""
        given = [(key, query[key]) for key in SELECTORS if key in query]
        if not given:
            return self.system
        for identity in self.user_assigned:
            if all(identity.matches(key, value) for key, value in given):
                return identity
        return None

    def replace(self, document: Any) -> None:
        """``{"system_assigned": bool, "user_assigned": [{client_id, object_id, msi_res_id}]}``.

        Validated in full before anything changes; a system-assigned identity switched off
        and on again keeps its ids.
        """
        if not isinstance(document, dict):
            raise IdentityConfigError("identities must be an object")
        unknown = sorted(set(document) - {"system_assigned", "user_assigned"})
        if unknown:
            raise IdentityConfigError(
                f"unknown key {unknown[0]!r}; known: system_assigned, user_assigned"
            )
        enabled = document.get("system_assigned", self.system is not None)
        if not isinstance(enabled, bool):
            raise IdentityConfigError("system_assigned must be a boolean")
        entries = document.get("user_assigned", [_as_dict(i) for i in self.user_assigned])
        if not isinstance(entries, list):
            raise IdentityConfigError("user_assigned must be an array")
        user = [_parse_identity(entry, f"user_assigned[{n}]") for n, entry in enumerate(entries)]
        self.system = self._system_ids if enabled else None
        self.user_assigned = user

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (GET /_emulator/state)."""
        return {
            "system_assigned": _as_dict(self.system) if self.system else None,
            "user_assigned": [_as_dict(i) for i in self.user_assigned],
        }


def _as_dict(identity: Identity) -> dict[str, str]:
    return {
        "client_id": identity.client_id,
        "object_id": identity.object_id,
        "msi_res_id": identity.msi_res_id,
    }


def _parse_identity(entry: Any, where: str) -> Identity:
    if not isinstance(entry, dict):
        raise IdentityConfigError(f"{where} must be an object")
    fields = ("client_id", "object_id", "msi_res_id")
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise IdentityConfigError(f"{where}: unknown key {unknown[0]!r}")
    values = {}
    for key in fields:
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise IdentityConfigError(f"{where}.{key} must be a non-empty string")
        values[key] = value
    return Identity(**copy.deepcopy(values))


class IdentityGate:
    """Counts managed-identity requests in flight and refuses those over ``limit``."""

    def __init__(self, limit: int = DEFAULT_CONCURRENCY, latency: float = 0.0) -> None:
        self.limit = limit
        self.latency = latency
        self.in_flight = 0
        self.peak = 0
        self.refused = 0

    @staticmethod
    def covers(path: str) -> bool:
        """True for managed-identity paths (the only ones this gate counts)."""
        return path == IDENTITY_PREFIX or path.startswith(IDENTITY_PREFIX + "/")

    def enter(self) -> bool:
        """Admit one request (True) or refuse it because ``limit`` are in flight (False)."""
        if self.limit > 0 and self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return True

    def leave(self) -> None:
        """One admitted request was answered (or abandoned)."""
        self.in_flight = max(0, self.in_flight - 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view: limit, latency, in flight, peak and refused counts."""
        return {
            "identity_concurrency": self.limit,
            "identity_latency": self.latency,
            "identity_in_flight": self.in_flight,
            "identity_peak_in_flight": self.peak,
            "identity_refused_concurrent": self.refused,
        }
