"""The local API on the unix socket (CONTRACT section 3).

- :mod:`imdsd.api.context`: :class:`ApiContext`, what the API needs from the daemon.
- :mod:`imdsd.api.routes`: request -> reply dispatch (sans-IO).
- :mod:`imdsd.api.replies`: replies, ETags and the per-revision reply cache (sans-IO).
- :mod:`imdsd.api.params`: query parameter checks (sans-IO).
- :mod:`imdsd.api.reads`: reads of the cached IMDS documents (sans-IO).
- :mod:`imdsd.api.v1`: imdsd's own endpoints, /v1/... and /metrics (sans-IO).
- :mod:`imdsd.api.access`: restricted paths, peer credentials policy, redaction (sans-IO).
- :mod:`imdsd.api.lines`: NDJSON frame lines encoded once per revision (sans-IO).
- :mod:`imdsd.api.cursor`: the server side of the watch protocol, per stream (sans-IO).
- :mod:`imdsd.api.watch`: watch streams and long polls (trio).
- :mod:`imdsd.api.metrics`: Prometheus metrics registry.
- :mod:`imdsd.api.server`: listeners and dispatch (trio).
"""
