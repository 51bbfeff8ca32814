"""The IMDS front: an IMDS-compatible TCP listener for unmodified agents (CONTRACT 7).

Sans-IO parts: :mod:`.rules` (request validation with IMDS's own answers), :mod:`.shaping`
(documents at an older api-version), :mod:`.cache` (answers from imdsd's cache),
:mod:`.forward` (fair queue and the identity limiter), :mod:`.tokens` (managed-identity token
cache) and :mod:`.callers` (who is calling). Trio shells: :mod:`.relay` (forwarding upstream)
and :mod:`.server` (the listener).
"""
