"""Process trees from /proc: children, descendants that left the group, pid reuse."""

from __future__ import annotations

import signal
import subprocess
import time

from imdsd.hooks.tree import ProcessTree, _children_by_scan, children

NESTED = "setsid sh -c 'sleep 1000 & echo $!; wait' & echo $!; wait"


def test_children_files_and_a_proc_scan_agree() -> None:
    with subprocess.Popen(["sh", "-c", "sleep 1000 & sleep 1000 & wait"]) as proc:
        try:
            while len(children(proc.pid)) < 2:
                time.sleep(0.01)
            assert sorted(children(proc.pid)) == sorted(_children_by_scan(proc.pid))
        finally:
            tree = ProcessTree(proc.pid)
            tree.observe()
            tree.signal(signal.SIGKILL)
            proc.kill()


def test_a_tree_keeps_grandchildren_after_their_parent_left_and_forgets_the_dead() -> None:
    with subprocess.Popen(["sh", "-c", NESTED], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        middle, grandchild = int(proc.stdout.readline()), int(proc.stdout.readline())
        tree = ProcessTree(proc.pid)
        tree.observe()
        assert {middle, grandchild} <= set(tree.live())
        assert tree.signal(signal.SIGTERM) >= 2
        proc.kill()
        proc.wait()
        while tree.live():
            time.sleep(0.01)
        tree.observe()
        tree.reap()
        assert tree.live() == []
        assert tree.signal(signal.SIGKILL) == 0  # nothing known is alive: no stray signal
