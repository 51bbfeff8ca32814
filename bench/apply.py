"""Micro-benchmark of the change path: decode + diff + store apply of one instance document.

Run: ``.venv/bin/python bench/apply.py [--rounds N]``. Uses the golden Windows document from
``tests/data``; alternates between two versions of it (one tag differs) so every apply has a
change to report, and also measures the no-change case. Prints microseconds per snapshot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import msgspec

from imdsd.changes import diff
from imdsd.model import Snapshot, parse_instance
from imdsd.store import Store

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "instance-windows.json"


def _variant(document: dict[str, object], value: str) -> bytes:
    changed = json.loads(json.dumps(document))
    compute = changed["compute"]
    compute["tags"] = f"baz:bash;foo:{value}"
    compute["tagsList"] = [{"name": "baz", "value": "bash"}, {"name": "foo", "value": value}]
    return msgspec.json.encode(changed)


def _per_snapshot(bodies: list[bytes], rounds: int) -> list[float]:
    """Microseconds per (decode + diff + apply), one sample per batch of 100."""
    store = Store(diff=diff, snapshot_type=Snapshot, history=4096)
    samples = []
    base = Snapshot()
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(100):
            instance, raw = parse_instance(bodies[i % len(bodies)])
            snapshot = msgspec.structs.replace(base, instance=instance, instance_raw=raw)
            store.apply(snapshot, 1_700_000_000.0 + i)
        samples.append((time.perf_counter() - started) / 100 * 1e6)
    return samples


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="batches of 100 snapshots")
    args = parser.parse_args()
    document = json.loads(DATA.read_text())
    changing = [_variant(document, "a"), _variant(document, "b")]
    same = [_variant(document, "a")]
    rows = [
        ("decode+diff+apply, 1 tag changed", _per_snapshot(changing, args.rounds)),
        ("decode+diff+apply, no change", _per_snapshot(same, args.rounds)),
    ]
    print(f"golden {DATA.name}, {len(changing[0])} bytes, {args.rounds}x100 snapshots each")
    for name, samples in rows:
        print(
            f"  {name:<36} median {statistics.median(samples):7.1f} us/snapshot"
            f"  (best {min(samples):.1f}, worst {max(samples):.1f})"
        )
    median_change = statistics.median(rows[0][1])
    median_same = statistics.median(rows[1][1])
    print(f"RESULT apply_change_us={median_change:.1f} apply_nochange_us={median_same:.1f}")


if __name__ == "__main__":
    main()
