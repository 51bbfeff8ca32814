"""The front's sans-IO modules load no event loop or logger (same probe as test_imports)."""

from __future__ import annotations

import pytest
from test_imports import IO_LIBRARIES, loaded_after_import

FRONT_CORE = (
    "imdsd.front.cache",
    "imdsd.front.callers",
    "imdsd.front.forward",
    "imdsd.front.rules",
    "imdsd.front.shaping",
    "imdsd.front.sockdiag",
    "imdsd.front.tokens",
)


@pytest.mark.parametrize("module", FRONT_CORE)
def test_front_core_module_imports_no_io_library(module: str) -> None:
    assert loaded_after_import(module, IO_LIBRARIES) == []
