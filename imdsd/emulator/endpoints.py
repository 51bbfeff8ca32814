"""The emulated IMDS endpoints (sans-IO): one request in, one :class:`Answer` out.

The rules of :mod:`imdsd.emulator.rules` run first; an accepted request is then answered from
the :class:`~imdsd.emulator.state.VMState`, shaped for the profile and api-version:

- ``/metadata/versions``: ``{"apiVersions": [...]}`` (oldest first);
- ``/metadata/instance[/key-or-index...]``: route filtering and ``format`` as in
  :mod:`imdsd.filtering` (JSON on a leaf is refused with 400, as IMDS does);
- ``/metadata/scheduledevents``: GET the document (events whose NotBefore has passed are
  started first); POST ``{"StartRequests": [...]}`` approves (200, empty body; 400 malformed
  or unknown EventId);
- ``/metadata/loadbalancer``: the document, 404 when the VM has no Standard LB;
- ``/metadata/attested/document[?nonce=...]``: see :mod:`imdsd.emulator.attested`;
- ``/metadata/identity/oauth2/token?resource=...``: a fake token for the identity the query
  selects (:mod:`imdsd.emulator.identity`); no ``resource``, or an identity the VM does not
  have, gives the OAuth-style 400 ``{"error": "invalid_request", "error_description": ...}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from imdsd.emulator.attested import (
    attested_document,
    attested_payload,
    default_nonce,
    identity_token,
)
from imdsd.emulator.identity import NOT_FOUND
from imdsd.emulator.profiles import Endpoint
from imdsd.emulator.rules import ImdsRequest, RequestRules
from imdsd.emulator.state import StateError, VMState
from imdsd.filtering import FilterError, parse_format, render, resolve
from imdsd.imdsfields import ATTESTED_FIELDS
from imdsd.imdsrules import Rejection

JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    """A complete HTTP answer: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def header_list(self) -> list[tuple[bytes, bytes]]:
        """Headers for :meth:`imdsd.httpio.Responder.send` (content type included)."""
        out = [(b"content-type", self.content_type.encode("latin-1"))]
        out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        return out


def json_answer(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    """An answer whose body is ``document`` as compact JSON."""
    return Answer(status, msgspec.json.encode(document), JSON, headers)


def error_answer(status: int, message: str) -> Answer:
    """An IMDS-like error answer: ``{"error": message}``."""
    return json_answer(status, {"error": message})


def answer_imds(
    state: VMState,
    rules: RequestRules,
    *,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    now: float,
    now_wall: float,
) -> Answer:
    """Answer one IMDS request (``now``: monotonic seconds, ``now_wall``: epoch seconds)."""
    verdict = rules.check(method, target, headers, now)
    if isinstance(verdict, Rejection):
        return json_answer(verdict.status, verdict.body, verdict.headers)
    match verdict.endpoint:
        case Endpoint.VERSIONS:
            return json_answer(200, {"apiVersions": list(rules.profile.versions)})
        case Endpoint.INSTANCE:
            return _instance(state, rules, verdict)
        case Endpoint.SCHEDULED_EVENTS:
            return _scheduled_events(
                state, rules, verdict, method=method, body=body, now_wall=now_wall
            )
        case Endpoint.LOADBALANCER:
            if state.loadbalancer is None:
                return error_answer(
                    404, "Not found. This VM is not behind a Standard Load Balancer"
                )
            return json_answer(200, state.loadbalancer)
        case Endpoint.ATTESTED:
            nonce = verdict.query.get("nonce") or default_nonce(now_wall)
            payload = attested_payload(
                state.instance,
                nonce=nonce,
                now_wall=now_wall,
                include_license=verdict.api_version >= ATTESTED_FIELDS["licenseType"],
            )
            return json_answer(200, attested_document(payload))
        case Endpoint.IDENTITY:
            resource = verdict.query.get("resource")
            if not resource:
                return json_answer(
                    400,
                    {
                        "error": "invalid_request",
                        "error_description": "Required query variable 'resource' is missing",
                    },
                )
            identity = state.identities.select(verdict.query)
            if identity is None:
                return json_answer(400, NOT_FOUND)
            return json_answer(
                200,
                identity_token(
                    resource,
                    client_id=identity.client_id,
                    object_id=identity.object_id,
                    now_wall=now_wall,
                ),
            )
    raise AssertionError(f"unrouted endpoint {verdict.endpoint}")  # pragma: no cover


def _instance(state: VMState, rules: RequestRules, request: ImdsRequest) -> Answer:
    try:
        fmt = parse_format(request.query.get("format"))
        document = rules.profile.shape_instance(state.instance, request.api_version)
        value = resolve(document, request.segments)
        body, content_type = render(value, fmt, leaf_json_allowed=False)
    except FilterError as exc:
        return error_answer(exc.status, str(exc))
    return Answer(200, body, content_type)


def _scheduled_events(
    state: VMState,
    rules: RequestRules,
    request: ImdsRequest,
    *,
    method: str,
    body: bytes,
    now_wall: float,
) -> Answer:
    if method == "POST":
        try:
            state.approve(msgspec.json.decode(body) if body else None)
        except msgspec.DecodeError as exc:
            return error_answer(400, f"Bad request. The body is not valid JSON: {exc}")
        except StateError as exc:
            return error_answer(400, f"Bad request. {exc}")
        return Answer(200, b"")
    state.start_due_events(now_wall)
    document = rules.profile.shape_scheduled_events(state.scheduled_events(), request.api_version)
    return json_answer(200, document)
