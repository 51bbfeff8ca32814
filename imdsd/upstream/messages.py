"""What the upstream client sends and gets (sans-IO): targets, headers, answers.

- Every request of imdsd's own carries ``Metadata: true``, ``User-Agent: imdsd/<version>``
  and a fresh ``x-ms-client-request-id``; never ``X-Forwarded-For``; the query string is
  built from a mapping, so no parameter appears twice. ``Host`` is added by the pool.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from imdsd import __version__

USER_AGENT: Final = f"imdsd/{__version__}"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request as it is to be sent, without ``Host`` (the pool adds the endpoint's).

    ``timeout`` bounds the whole exchange; None means the configured read timeout.
    """

    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes = b""
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """One complete IMDS answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful versioned request: the answer and the api-version that got it."""

    endpoint: str
    version: str
    response: UpstreamResponse

    @property
    def body(self) -> bytes:
        """The answer's body."""
        return self.response.body


def build_target(path: str, query: Mapping[str, str] | None) -> str:
    """``path?query`` with each parameter once, percent-encoded; ``path`` must be absolute."""
    if not path.startswith("/") or "?" in path or "#" in path:
        raise ValueError(f"expected an absolute path without query, got {path!r}")
    quoted = urllib.parse.quote(path, safe="/")
    if not query:
        return quoted
    return quoted + "?" + urllib.parse.urlencode(dict(query), quote_via=urllib.parse.quote)


def own_headers(method: str) -> list[tuple[str, str]]:
    """The headers of one of imdsd's own requests but ``Host`` (a fresh request id each time)."""
    headers = [
        ("Metadata", "true"),
        ("User-Agent", USER_AGENT),
        ("x-ms-client-request-id", str(uuid.uuid4())),
    ]
    if method == "POST":
        headers.append(("Content-Type", "application/json"))
    return headers
