"""Benchmark of the persistence path: what saving one revision costs as history grows.

Run: ``.venv/bin/python bench/persist.py [--revisions N] [--tags T] [--history H]``.
Alternates two instance documents with ``T`` tags each (every tag value differs between
them, so every revision changes ``T`` tags) through the real :class:`~imdsd.keeper.StateKeeper`
and its real saves into a temporary state directory (``--changed N``: only N tags differ).
Prints the bytes written per revision (from ``/proc/self/io``), the state directory's size,
RSS and CPU time. Before the journal (commit 5e7fe25), 100 revisions of 10,000 changed tags
ended at 89.6 MB written per revision, a 98.9 MB state and 279 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio

from imdsd import keeper as keeper_module
from imdsd.model import parse_instance

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "instance-windows.json"


def _variant(document: dict[str, Any], tags: int, value: str, differ: int) -> bytes:
    changed = json.loads(json.dumps(document))
    pairs = [(f"tag{i:05d}", f"{value if i < differ else 'same'}-{i}") for i in range(tags)]
    changed["compute"]["tags"] = ";".join(f"{k}:{v}" for k, v in pairs)
    changed["compute"]["tagsList"] = [{"name": k, "value": v} for k, v in pairs]
    return msgspec.json.encode(changed)


def _written() -> int:
    with open("/proc/self/io") as file:
        for line in file:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _rss_mib() -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _directory_size(path: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


async def _run(
    directory: str, bodies: list[bytes], revisions: int, history: int, history_bytes: int
) -> None:
    if hasattr(keeper_module.StateKeeper, "load"):
        keeper = keeper_module.StateKeeper.load(directory, history, history_bytes)
    else:  # the code before the journal, for the before/after figures
        keeper = keeper_module.StateKeeper(keeper_module.load_store(directory, history), directory)
    docs = [parse_instance(body) for body in bodies]
    await keeper.instance(*docs[0])
    rows = []
    started_cpu = time.process_time()
    started_wall = time.perf_counter()
    step = max(1, revisions // 5)
    written = _written()
    for index in range(1, revisions + 1):
        await keeper.instance(*docs[index % 2])
        if index % step == 0:
            now = _written()
            rows.append((index, (now - written) / step, _directory_size(directory), _rss_mib()))
            written = now
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall
    print(f"{'revision':>8} {'written/rev':>12} {'state size':>11} {'RSS':>9}")
    for index, per_revision, size, rss in rows:
        print(f"{index:>8} {per_revision / 1e3:>10.1f}kB {size / 1e6:>9.2f}MB {rss:>7.0f}MB")
    print(
        f"{revisions} revisions in {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({cpu / revisions * 1e3:.0f} ms CPU per revision); revision {keeper.revision}"
    )


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--revisions", type=int, default=200)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=None, help="tags that differ")
    parser.add_argument("--history", type=int, default=4096, help="state.history")
    parser.add_argument(
        "--history-bytes", type=int, default=16 * 1024 * 1024, help="state.history_bytes"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    document = json.loads(DATA.read_text())
    differ = args.tags if args.changed is None else args.changed
    bodies = [_variant(document, args.tags, v, differ) for v in ("a", "b")]
    print(
        f"{args.tags} tags per document ({len(bodies[0])} bytes), {differ} differ, "
        f"{args.revisions} revisions"
    )
    with tempfile.TemporaryDirectory() as directory:
        trio.run(_run, directory, bodies, args.revisions, args.history, args.history_bytes)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"max RSS {usage.ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
