"""Attested document and managed identity token of the emulator (sans-IO).

The attested document is ``{"encoding": "pkcs7", "signature": <base64 DER>}`` like IMDS's, but
the PKCS#7 is **unsigned**: a degenerate SignedData (RFC 5652) that carries the JSON payload as
its content with no certificates and no signer infos. It parses as PKCS#7 (``openssl pkcs7
-inform DER -print``) and its content is the payload IMDS signs (nonce, plan, sku,
subscriptionId, timeStamp, vmId, licenseType), but there is nothing to verify.

The identity token is a JWT with ``alg: none`` and an empty signature, inside the usual
managed identity answer (every value a string, as IMDS sends it).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

OID_SIGNED_DATA = bytes.fromhex("2a864886f70d010702")  # 1.2.840.113549.1.7.2
OID_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
ATTESTED_LIFETIME = timedelta(hours=6)
TOKEN_LIFETIME = 86399


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV with a definite length."""
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def unsigned_pkcs7(content: bytes) -> bytes:
    """A DER ContentInfo holding a degenerate SignedData that wraps ``content``."""
    encapsulated = _der(0x30, _der(0x06, OID_DATA) + _der(0xA0, _der(0x04, content)))
    signed_data = _der(
        0x30,
        _der(0x02, b"\x01")  # version 1
        + _der(0x31, b"")  # digestAlgorithms: none
        + encapsulated
        + _der(0x31, b""),  # signerInfos: none
    )
    return _der(0x30, _der(0x06, OID_SIGNED_DATA) + _der(0xA0, signed_data))


def _stamp(moment: datetime) -> str:
    return moment.strftime("%m/%d/%y %H:%M:%S -0000")


def default_nonce(now_wall: float) -> str:
    """IMDS's nonce when none is given: the UTC time as ``YYYYMMDD-HHMMSS``."""
    return datetime.fromtimestamp(now_wall, UTC).strftime("%Y%m%d-%H%M%S")


def attested_payload(
    instance: dict[str, Any], *, nonce: str, now_wall: float, include_license: bool
) -> dict[str, Any]:
    """The JSON that the attested document carries, built from the instance document."""
    compute = instance.get("compute")
    compute = compute if isinstance(compute, dict) else {}
    plan = compute.get("plan")
    created = datetime.fromtimestamp(now_wall, UTC)
    payload: dict[str, Any] = {
        "nonce": nonce,
        "plan": plan if isinstance(plan, dict) else {"name": "", "product": "", "publisher": ""},
        "sku": str(compute.get("sku", "")),
        "subscriptionId": str(compute.get("subscriptionId", "")),
        "timeStamp": {
            "createdOn": _stamp(created),
            "expiresOn": _stamp(created + ATTESTED_LIFETIME),
        },
        "vmId": str(compute.get("vmId", "")),
    }
    if include_license:
        payload["licenseType"] = str(compute.get("licenseType", ""))
    return payload


def attested_document(payload: dict[str, Any]) -> dict[str, str]:
    """``{"encoding": "pkcs7", "signature": ...}`` wrapping ``payload`` (unsigned)."""
    content = json.dumps(payload, separators=(",", ":")).encode()
    return {"encoding": "pkcs7", "signature": base64.b64encode(unsigned_pkcs7(content)).decode()}


def _b64url(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def identity_token(
    resource: str, *, client_id: str, object_id: str, now_wall: float
) -> dict[str, str]:
    """A managed identity token answer with a fake, unsigned (``alg: none``) JWT."""
    now = int(now_wall)
    expires = now + TOKEN_LIFETIME
    claims = {
        "aud": resource,
        "iss": "https://sts.windows.net/imdsd-emulator/",
        "iat": now,
        "nbf": now,
        "exp": expires,
        "appid": client_id,
        "oid": object_id,
        "sub": object_id,
    }
    token = f"{_b64url({'typ': 'JWT', 'alg': 'none'})}.{_b64url(claims)}."
    return {
        "access_token": token,
        "client_id": client_id,
        "expires_in": str(TOKEN_LIFETIME),
        "expires_on": str(expires),
        "ext_expires_in": str(TOKEN_LIFETIME),
        "not_before": str(now),
        "resource": resource,
        "token_type": "Bearer",
    }
