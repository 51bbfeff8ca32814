"""What a hook is: a frozen definition, compared by value so a reload can keep its state."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TIMEOUT = 60.0
DEFAULT_DEBOUNCE = 1.0
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class RunAs:
    """The identity a hook runs as: user name, uid, primary gid and supplementary groups."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Hook:
    """One hook: which kinds wake it, what to run, and how patiently.

    ``directory_kind`` is set for hooks found in ``<hooks.directory>/<kind>.d/``; their argv
    is ``[path, kind, revision]``. ``run_as`` is None to run as the daemon's own user.
    """

    name: str
    kinds: frozenset[str]
    command: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    debounce: float = DEFAULT_DEBOUNCE
    retries: int = DEFAULT_RETRIES
    run_as: RunAs | None = None
    directory_kind: str | None = None

    @property
    def source(self) -> str:
        """Where the hook was declared: ``config`` or the path of its file."""
        return "config" if self.directory_kind is None else self.command[0]

    def argv(self, revision: int) -> list[str]:
        """The argv of a run delivering up to ``revision``."""
        if self.directory_kind is None:
            return list(self.command)
        return [*self.command, self.directory_kind, str(revision)]
