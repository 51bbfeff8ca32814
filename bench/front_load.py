"""Load for the ``front`` bench phase, run inside the phase's network namespace.

``--role agents``: N threads, each an agent polling ``/metadata/instance`` at
``http://169.254.169.254`` once per second on a fresh connection (like curl), no retries. The
agents' phases are spread evenly over the second, as independent agents' are: 50 threads of one
process firing at the same instant would mostly measure this process's own GIL queue.
``--role tokens``: one process asking for a managed-identity token once per second, each for a
new resource (so neither imdsd's token cache nor anyone else's answers it).
Both talk to the IMDS address exactly as unmodified agents do; whether imdsd answers depends
only on the redirect. Prints one JSON object: statuses, latencies (ms), answers served by
imdsd (``Server: imdsd/...``) and where they came from (``X-Imdsd-Source``), and the CPU
seconds this load process used (to show it is not the bottleneck).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import threading
import time
from collections import Counter
from typing import Any

IMDS = "169.254.169.254"
INSTANCE = "/metadata/instance?api-version=2021-02-01"
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource="


class Tally:
    """Shared counters of one load process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.latency_ms: list[float] = []
        self.ok_ms: list[float] = []  # latencies of the 200 answers only
        self.errors = 0

    def get(self, target: str, timeout: float) -> None:
        """One GET on a fresh connection, recorded."""
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection(IMDS, 80, timeout=timeout)
            conn.request("GET", target, headers={"Metadata": "true"})
            response = conn.getresponse()
            response.read()
            conn.close()
        except OSError:
            with self.lock:
                self.errors += 1
            return
        elapsed = (time.monotonic() - started) * 1000.0
        via_imdsd = (response.getheader("server") or "").startswith("imdsd/")
        source = (response.getheader("x-imdsd-source") or "imdsd") if via_imdsd else "direct"
        with self.lock:
            self.statuses[str(response.status)] += 1
            self.sources[source] += 1
            self.latency_ms.append(elapsed)
            if response.status == 200:
                self.ok_ms.append(elapsed)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "statuses": dict(self.statuses),
            "sources": dict(self.sources),
            "latency_ms": self.latency_ms,
            "ok_ms": self.ok_ms,
            "errors": self.errors,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }


def _every_second(duration: float, action: Any, offset: float = 0.0) -> None:
    time.sleep(offset)
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < duration:
        action(tick)
        tick += 1
        time.sleep(max(0.0, start + tick - time.monotonic()))


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=("agents", "tokens"), required=True)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to begin")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    time.sleep(max(0.0, args.start_at - time.time()))
    tally = Tally()
    if args.role == "tokens":
        pid = os.getpid()
        _every_second(
            args.duration,
            lambda tick: tally.get(f"{TOKEN}https%3A%2F%2Fbench-{pid}-{tick}", args.timeout),
        )
    else:
        threads = [
            threading.Thread(
                target=_every_second,
                args=(
                    args.duration,
                    lambda _tick: tally.get(INSTANCE, args.timeout),
                    n / args.agents,
                ),
            )
            for n in range(args.agents)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(json.dumps(tally.as_dict()))


if __name__ == "__main__":
    main()
