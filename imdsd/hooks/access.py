"""What a hook may see (sans-IO): its frame redacted as the socket would for its identity."""

from __future__ import annotations

from imdsd.api.access import AccessPolicy, Peer
from imdsd.frames import ChangeFrame
from imdsd.hooks.model import RunAs


def hook_peer(run_as: RunAs | None, euid: int, egid: int) -> Peer:
    """The credentials a hook process presents: its ``user``'s, else the daemon's."""
    if run_as is None:
        return Peer(pid=0, uid=euid, gid=egid)
    return Peer(pid=0, uid=run_as.uid, gid=run_as.gid)


def frame_for_hook(
    frame: ChangeFrame, run_as: RunAs | None, policy: AccessPolicy, euid: int, egid: int
) -> ChangeFrame:
    """``frame`` as the socket would show it to a peer with the hook's uid and primary gid.

    A hook running as a uid (or primary gid) the policy does not allow gets restricted values
    (``compute/userData``, ``compute/customData`` ...) as ``"<redacted>"``, exactly like a
    watch on the socket; ``euid``/``egid`` are the daemon's own, used when ``run_as`` is None.
    """
    if policy.level(hook_peer(run_as, euid, egid)) == "full":
        return frame
    return policy.redact_frame(frame)
