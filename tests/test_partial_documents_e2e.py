"""``imdsd run`` against the emulator serving documents with sections missing (issue 12.1-2).

A document the official API description allows (its own example has no ``network``) gives a
first snapshot; changes made while a section is missing upstream are reported exactly once,
when it comes back, and a missing section is never reported as removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_support import DaemonProcess, daemon, emulator, write_config

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
INSTANCE = "/metadata/instance"


async def _json(proc: DaemonProcess, target: str) -> Any:
    response = await proc.get(target)
    assert response.status == 200, (target, response.status, response.body)
    return msgspec.json.decode(response.body)


async def _served(proc: DaemonProcess, expected: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while (await proc.get(INSTANCE)).body != msgspec.json.encode(expected):
            await trio.sleep(0.1)


async def test_the_descriptions_example_without_network_is_served(tmp_path: Path) -> None:
    example = (DATA / "spec-instance-2021-11-15.json").read_bytes()
    async with emulator() as emu:
        await emu.fault(path=INSTANCE, body=example.decode(), count=10_000)
        async with daemon(write_config(tmp_path, emu.endpoint)) as proc:
            await proc.wait_ready()
            await _served(proc, json.loads(example))
            assert (await proc.get(INSTANCE + "/network")).status == 404
            health = await _json(proc, "/v1/health")
            assert health["status"] == "ok", health
            assert await proc.stop() == 0


async def test_changes_made_while_sections_were_missing_are_reported_once(
    tmp_path: Path,
) -> None:
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint)
        async with daemon(config) as proc:
            await proc.wait_ready()
            state = await _json(proc, "/v1/state")
            since = state["revision"]
            full = state["instance"]
            [disk, *_] = full["compute"]["storageProfile"]["dataDisks"]
            await emu.action(action="add_nic", mac="000D3A0000AB", private_ip="10.0.9.9")
            with trio.fail_after(10):
                while not (await _json(proc, f"/v1/events?since={since}&wait=5s"))["frames"]:
                    pass
            since = (await _json(proc, "/v1/state"))["revision"]

            partial: dict[str, Any] = {"compute": {}, "network": {}}
            await emu.fault(path=INSTANCE, body=json.dumps(partial), count=10_000)
            await _served(proc, partial)
            await emu.action(action="set_tag", name="while-missing", value="1")
            await emu.action(action="detach_disk", lun=int(disk["lun"]))
            await emu.action(action="remove_nic", mac="000D3A0000AB")
            await trio.sleep(2.5)  # polls of the partial document: nothing to report
            quiet = await _json(proc, f"/v1/events?since={since}&wait=0s")
            assert quiet["frames"] == [], quiet

            await emu.call("DELETE", "/_emulator/faults")
            with trio.fail_after(10):
                while not (await _json(proc, f"/v1/events?since={since}&wait=5s"))["frames"]:
                    pass
            await trio.sleep(2.5)  # more polls of the full document: nothing more
            frames = (await _json(proc, f"/v1/events?since={since}&wait=0s"))["frames"]
            assert len(frames) == 1, frames
            assert sorted((c["kind"], c["op"], c["key"]) for c in frames[0]["changes"]) == [
                ("disks", "detached", f"lun:{int(disk['lun'])}"),
                ("network", "removed", "mac:000D3A0000AB"),
                ("tags", "added", "while-missing"),
            ]
            assert await proc.stop() == 0


async def test_a_10000_deep_document_is_invalid_and_the_next_change_is_reported(
    tmp_path: Path,
) -> None:
    deep = '{"compute":{"name":"x","plan":' + '{"a":' * 10_000 + "1" + "}" * 10_000 + "}}"
    async with emulator() as emu, daemon(write_config(tmp_path, emu.endpoint)) as proc:
        await proc.wait_ready()
        since = (await _json(proc, "/v1/state"))["revision"]
        await emu.fault(path=INSTANCE, body=deep, count=2)
        with trio.fail_after(10):
            while True:
                instance = (await _json(proc, "/v1/health"))["upstream"]["instance"]
                if instance["failures"]["invalid"] >= 2:
                    break
                await trio.sleep(0.2)
        assert instance["failures"]["internal"] == 0
        assert "nested deeper than 32 levels" in instance["last_error"]
        await emu.action(action="set_tag", name="after-deep", value="1")
        with trio.fail_after(10):
            while not (await _json(proc, f"/v1/events?since={since}&wait=5s"))["frames"]:
                pass
        frames = (await _json(proc, f"/v1/events?since={since}&wait=0s"))["frames"]
        assert [(c["kind"], c["key"]) for f in frames for c in f["changes"]] == [
            ("tags", "after-deep")
        ]
        assert await proc.stop() == 0
