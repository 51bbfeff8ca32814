"""Where hooks come from: ``[[hook]]`` entries and executables in ``<kind>.d/`` directories.

Loading never raises for a bad hook: each problem is logged with the hook's name or path and
the hook is left out, so a reload with one broken file keeps every other hook running.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import structlog

from imdsd.frames import KINDS
from imdsd.hooks.model import DEFAULT_DEBOUNCE, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Hook, RunAs

log = structlog.get_logger("imdsd.hooks")

_BACKUP_SUFFIXES = ("~", ".swp", ".swo", ".swx")
_BACKUP_INFIXES = (".dpkg-", ".rpm", ".ucf-")


class HookEntry(Protocol):
    """What :func:`load_hooks` reads from one ``[[hook]]`` table."""

    @property
    def name(self) -> str: ...
    @property
    def on(self) -> Sequence[str]: ...
    @property
    def command(self) -> Sequence[str]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def debounce(self) -> float: ...
    @property
    def retries(self) -> int: ...
    @property
    def user(self) -> str: ...


class HooksSection(Protocol):
    """What :func:`load_hooks` reads from ``[hooks]``."""

    @property
    def directory(self) -> str: ...


class HooksSource(Protocol):
    """The parts of the configuration that declare hooks."""

    @property
    def hooks(self) -> HooksSection: ...
    @property
    def hook(self) -> Sequence[HookEntry]: ...


class HookUserError(ValueError):
    """A hook's ``user`` cannot be used; the message says why."""


def load_hooks(config: HooksSource, *, euid: int | None = None) -> list[Hook]:
    """Build the hook list from ``[[hook]]`` entries, then ``<hooks.directory>/<kind>.d/``.

    ``euid`` is the daemon's effective uid (default: the current one). Called again on SIGHUP;
    hooks compare by value, so an unchanged hook is recognised and keeps its state.
    """
    uid = os.geteuid() if euid is None else euid
    hooks: list[Hook] = []
    for index, entry in enumerate(config.hook):
        hook = _config_hook(entry, index, uid)
        if hook is None:
            continue
        if any(h.name == hook.name for h in hooks):
            log.error("hook skipped", hook=hook.name, reason="duplicate name")
            continue
        hooks.append(hook)
    section = config.hooks
    timeout = getattr(section, "timeout", DEFAULT_TIMEOUT)
    debounce = getattr(section, "debounce", DEFAULT_DEBOUNCE)
    retries = getattr(section, "retries", DEFAULT_RETRIES)
    hooks.extend(
        scan_directory(
            section.directory,
            euid=uid,
            taken={h.name for h in hooks},
            timeout=float(timeout) if isinstance(timeout, int | float) else DEFAULT_TIMEOUT,
            debounce=float(debounce) if isinstance(debounce, int | float) else DEFAULT_DEBOUNCE,
            retries=retries if isinstance(retries, int) else DEFAULT_RETRIES,
        )
    )
    return hooks


def _config_hook(entry: HookEntry, index: int, euid: int) -> Hook | None:
    """One ``[[hook]]`` as a :class:`Hook`, or None (logged) when it cannot run."""
    where = f"hook[{index}]"
    unknown = [k for k in entry.on if k not in KINDS]
    if not entry.on or unknown:
        log.error(
            "hook skipped",
            hook=entry.name,
            key=f"{where}.on",
            reason=f"unknown kinds {unknown}" if unknown else "no kinds",
        )
        return None
    if not entry.command or not entry.command[0]:
        log.error("hook skipped", hook=entry.name, key=f"{where}.command", reason="empty command")
        return None
    problem: str | None = None
    try:
        run_as = resolve_user(entry.user, euid)
    except HookUserError as exc:
        problem = str(exc)
    if problem is not None:
        log.error("hook skipped", hook=entry.name, key=f"{where}.user", reason=problem)
        return None
    return Hook(
        name=entry.name,
        kinds=frozenset(entry.on),
        command=tuple(entry.command),
        timeout=entry.timeout,
        debounce=entry.debounce,
        retries=entry.retries,
        run_as=run_as,
    )


def resolve_user(user: str, euid: int) -> RunAs | None:
    """The identity for a hook's ``user`` (name or numeric uid); None = the daemon's own.

    Switching needs root: a daemon not running as root accepts only its own user.
    """
    if not user:
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise HookUserError(f"unknown user {user!r}") from None
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise HookUserError(
            f"user {user!r} needs the daemon to run as root (it runs as uid {euid})"
        )
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return RunAs(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def is_ignored_name(name: str) -> bool:
    """True for dotfiles and editor or package-manager leftovers (``*~``, ``*.dpkg-*`` ...)."""
    return (
        name.startswith(".")
        or (name.startswith("#") and name.endswith("#"))
        or name.endswith(_BACKUP_SUFFIXES)
        or any(infix in name for infix in _BACKUP_INFIXES)
    )


def check_hook_file(path: str, euid: int) -> str | None:
    """Why ``path`` must not run as a hook, or None when it may.

    It must be a regular executable file (symlinks are followed), owned by root or ``euid``,
    not writable by group or others, and neither set-user-ID nor set-group-ID.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (0, euid):
        return f"owned by uid {st.st_uid}, expected root or uid {euid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        return f"set-user-ID or set-group-ID (mode {stat.S_IMODE(st.st_mode):04o})"
    if not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return f"not executable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _is_masked(path: str) -> bool:
    """A symlink to /dev/null disables a hook without a warning (the systemd convention)."""
    return os.path.islink(path) and os.path.realpath(path) == os.devnull


def _kind_files(directory: str, kind: str) -> list[str]:
    """File names in ``<directory>/<kind>.d/`` in lexical order; [] if there is none."""
    try:
        return sorted(os.listdir(os.path.join(directory, f"{kind}.d")))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("hook directory unreadable", path=f"{directory}/{kind}.d", reason=exc.strerror)
        return []


def scan_directory(
    directory: str,
    *,
    euid: int,
    taken: set[str] | frozenset[str] = frozenset(),
    timeout: float = DEFAULT_TIMEOUT,
    debounce: float = DEFAULT_DEBOUNCE,
    retries: int = DEFAULT_RETRIES,
) -> list[Hook]:
    """The hooks in ``<directory>/<kind>.d/`` for every kind, each directory in lexical order.

    A hook's name is its file name; when that name is also used by a ``[[hook]]`` (``taken``)
    or by a file in another kind's directory, it is ``<kind>.d/<file>`` instead. A missing
    directory gives no hooks. Directory hooks get ``timeout``, ``debounce`` and ``retries``.
    """
    _warn_unknown_directories(directory)
    found: list[tuple[str, str]] = []
    for kind in KINDS:
        for name in _kind_files(directory, kind):
            path = os.path.join(directory, f"{kind}.d", name)
            if is_ignored_name(name):
                log.debug("hook file ignored", path=path)
            elif _is_masked(path):
                log.info("hook masked", path=path)
            elif (reason := check_hook_file(path, euid)) is not None:
                log.warning("hook skipped", path=path, reason=reason)
            else:
                found.append((kind, name))
    uses = Counter(name for _, name in found)
    return [
        Hook(
            name=name if uses[name] == 1 and name not in taken else f"{kind}.d/{name}",
            kinds=frozenset((kind,)),
            command=(os.path.join(directory, f"{kind}.d", name),),
            timeout=timeout,
            debounce=debounce,
            retries=retries,
            directory_kind=kind,
        )
        for kind, name in found
    ]


def _warn_unknown_directories(directory: str) -> None:
    """Warn about ``*.d`` directories that name no kind (``tag.d`` instead of ``tags.d``)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in sorted(names):
        if name.endswith(".d") and name[:-2] not in KINDS and not name.startswith("."):
            log.warning(
                "hook directory ignored",
                path=os.path.join(directory, name),
                reason=f"not a kind; expected one of {', '.join(f'{k}.d' for k in KINDS)}",
            )


__all__ = [
    "HookEntry",
    "HookUserError",
    "HooksSection",
    "HooksSource",
    "check_hook_file",
    "is_ignored_name",
    "load_hooks",
    "resolve_user",
    "scan_directory",
]
