"""Simulated node agents that each want instance metadata no older than ``--period`` seconds.

Model (what a fleet of cron jobs and sidecars on one VM looks like): every agent refreshes
``/metadata/instance`` once per period (10 s: "data no older than 10 s"). Agents start together
like cron jobs or units started at boot, each at a random offset within the first second, and
keep their phase: cycle k fires at ``start + offset + k * period`` plus up to 200 ms of jitter.
Aggregate demand is agents / period (50 / 10 s = 5 req/s, IMDS's limit) but arrives in bursts.
Each request uses a fresh connection (like curl). A 429 (or other failure) is retried with
exponential backoff (0.5 s, 1 s, 2 s, with up to 50 % jitter), at most 3 times, never past the
end. One thread per agent.

Direct mode (``--tcp``) talks to IMDS with ``Metadata: true``; socket mode (``--unix``) reads
the same path from imdsd. Prints one JSON object: requests, statuses, 429s, retries, given up
refreshes, and the age of the data the agents got (from ``X-Imdsd-Fetched-At`` via imdsd).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from collections import Counter

from benchkit import (
    UnixHTTPConnection,
    add_address_arguments,
    parse_rfc3339,
    parsed_address,
    summarize,
)

TARGET = "/metadata/instance?api-version=2021-02-01"
RETRIES = 3
BACKOFF = 0.5


class Fleet:
    """Shared counters of all agents."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.requests = 0
        self.retries = 0
        self.refreshes = 0
        self.given_up = 0
        self.ages: list[float] = []

    def record(self, status: str, age: float | None) -> None:
        """Count one answer."""
        with self.lock:
            self.requests += 1
            self.statuses[status] += 1
            if age is not None:
                self.ages.append(age)


def fetch(where: str | tuple[str, int]) -> tuple[str, float | None]:
    """One request on a fresh connection: (status or error name, data age in seconds)."""
    conn: http.client.HTTPConnection
    if isinstance(where, str):
        conn = UnixHTTPConnection(where, timeout=10.0)
    else:
        conn = http.client.HTTPConnection(where[0], where[1], timeout=10.0)
    try:
        conn.request("GET", TARGET, headers={"Metadata": "true"})
        resp = conn.getresponse()
        resp.read()
        fetched = resp.getheader("x-imdsd-fetched-at")
        age = time.time() - parse_rfc3339(fetched) if fetched else None
        return str(resp.status), age
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, None
    finally:
        conn.close()


def agent(
    where: str | tuple[str, int],
    fleet: Fleet,
    rng: random.Random,
    *,
    start: float,
    end: float,
    period: float,
) -> None:
    """One agent's life: refresh every period, retry 429s and failures with backoff."""
    offset = rng.uniform(0.0, 1.0)
    cycle = 0
    while True:
        due = start + offset + cycle * period + rng.uniform(0.0, 0.2)
        cycle += 1
        if due >= end:
            return
        time.sleep(max(0.0, due - time.monotonic()))
        with fleet.lock:
            fleet.refreshes += 1
        for attempt in range(RETRIES + 1):
            status, age = fetch(where)
            fleet.record(status, age)
            if status == "200":
                break
            wait = BACKOFF * 2**attempt * (1 + rng.uniform(0.0, 0.5))
            if attempt == RETRIES or time.monotonic() + wait >= end:
                with fleet.lock:
                    fleet.given_up += 1
                break
            with fleet.lock:
                fleet.retries += 1
            time.sleep(wait)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_address_arguments(parser)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--period", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    where = parsed_address(args)
    fleet = Fleet()
    start = time.monotonic()
    end = start + args.duration
    threads = [
        threading.Thread(
            target=agent,
            args=(where, fleet, random.Random(args.seed * 1000 + i)),
            kwargs={"start": start, "end": end, "period": args.period},
            daemon=True,
        )
        for i in range(args.agents)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(max(0.0, end - time.monotonic()))
    result = {
        "agents": args.agents,
        "seconds": time.monotonic() - start,
        "refreshes": fleet.refreshes,
        "requests": fleet.requests,
        "statuses": dict(fleet.statuses),
        "throttled": fleet.statuses.get("429", 0),
        "retries": fleet.retries,
        "given_up": fleet.given_up,
        "age_s": summarize(fleet.ages),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
