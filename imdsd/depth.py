"""How deeply an IMDS document may nest, checked without recursion (sans-IO).

The deepest path any IMDS api-version describes is
``compute.storageProfile.osDisk.encryptionSettings.keyEncryptionKey.sourceVault.id``: seven
containers counting the document itself. ``MAX_DEPTH`` (32) leaves room for fields IMDS may
add, and keeps every walk over a document (the diff, the encoders) far from Python's
recursion limit. A deeper document is not one IMDS could send: it is refused as invalid.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_DEPTH", "too_deep"]

MAX_DEPTH = 32


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The JSON path of the first container nested deeper than ``limit``, or None.

    The document itself is at depth 1, so ``{"a": {}}`` has depth 2.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if depth > limit:
            return path
        if isinstance(node, dict):
            stack.extend(
                (v, depth + 1, f"{path}.{k}") for k, v in node.items() if isinstance(v, dict | list)
            )
        elif isinstance(node, list):
            stack.extend(
                (v, depth + 1, f"{path}[{i}]")
                for i, v in enumerate(node)
                if isinstance(v, dict | list)
            )
    return None
