"""The emulated VM's scheduled events (sans-IO): the ``/metadata/scheduledevents`` document.

Every operation validates its input and raises :class:`~imdsd.emulator.checks.StateError`
naming what is wrong. ``DocumentIncarnation`` grows by one on every change of the events
list. Operations that need a wall-clock date (NotBefore of a new event, which events are due)
take it as an argument; nothing here reads a clock.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from imdsd.emulator.checks import StateError, text

EVENT_TYPES = ("Reboot", "Redeploy", "Freeze", "Preempt", "Terminate")
EVENT_SOURCES = ("Platform", "User")
# Minimum notice per event type, from the Scheduled Events docs (Terminate: 5 to 15 minutes).
EVENT_NOTICE = {"Freeze": 900, "Reboot": 900, "Redeploy": 600, "Preempt": 30, "Terminate": 300}


def rfc1123(epoch: float) -> str:
    """An RFC 1123 date like ``Mon, 11 Apr 2022 22:26:58 GMT`` (Scheduled Events NotBefore)."""
    return formatdate(epoch, usegmt=True)


class ScheduledEvents:
    """The events list and its ``DocumentIncarnation``; mutated only through the methods."""

    def __init__(self, incarnation: int = 1) -> None:
        self.events: list[dict[str, Any]] = []
        self.incarnation = incarnation

    def document(self) -> dict[str, Any]:
        """The ``/metadata/scheduledevents`` document (a copy)."""
        return {"DocumentIncarnation": self.incarnation, "Events": copy.deepcopy(self.events)}

    def _event(self, event_id: str) -> dict[str, Any]:
        for event in self.events:
            if event["EventId"] == event_id:
                return event
        raise StateError(f"no scheduled event {event_id!r}", 404)

    def add(
        self,
        event_id: Any,
        event_type: Any,
        *,
        now_wall: float,
        vm_name: Callable[[], str],
        not_before: Any = None,
        resources: Any = None,
        description: Any = "",
        source: Any = "Platform",
        duration: Any = -1,
        status: Any = "Scheduled",
    ) -> dict[str, Any]:
        """Announce an event; NotBefore defaults to ``now_wall`` plus the type's notice and
        Resources to ``[vm_name()]``."""
        event_id = text(event_id, "event id")
        if event_type not in EVENT_TYPES:
            known = ", ".join(EVENT_TYPES)
            raise StateError(f"event type must be one of {known}, got {event_type!r}")
        if source not in EVENT_SOURCES:
            known = ", ".join(EVENT_SOURCES)
            raise StateError(f"event source must be one of {known}, got {source!r}")
        if status not in ("Scheduled", "Started"):
            raise StateError(f"event status must be Scheduled or Started, got {status!r}")
        if isinstance(duration, bool) or not isinstance(duration, int) or duration < -1:
            raise StateError(f"duration must be an integer >= -1, got {duration!r}")
        description = text(description, "description", empty=True)
        if resources is None:
            resources = [vm_name()]
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise StateError(f"resources must be a list of strings, got {resources!r}")
        if not_before is None:
            not_before = "" if status == "Started" else rfc1123(now_wall + EVENT_NOTICE[event_type])
        not_before = text(not_before, "not_before", empty=True)
        if any(e["EventId"] == event_id for e in self.events):
            raise StateError(f"scheduled event {event_id!r} already exists", 409)
        event = {
            "EventId": event_id,
            "EventStatus": status,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(resources),
            "NotBefore": not_before,
            "Description": description,
            "EventSource": source,
            "DurationInSeconds": duration,
        }
        self.events.append(event)
        self.incarnation += 1
        return copy.deepcopy(event)

    def start(self, event_id: Any) -> bool:
        """Start an event (Started, NotBefore ""); False if it had already started."""
        event = self._event(text(event_id, "event id"))
        if event["EventStatus"] == "Started":
            return False
        event["EventStatus"] = "Started"
        event["NotBefore"] = ""
        self.incarnation += 1
        return True

    def remove(self, event_id: Any) -> None:
        """Remove an event: it finished or was cancelled (404 if unknown)."""
        event = self._event(text(event_id, "event id"))
        self.events.remove(event)
        self.incarnation += 1

    def approve(self, body: Any) -> list[str]:
        """Apply ``{"StartRequests": [{"EventId": ...}]}`` (POST /metadata/scheduledevents).

        Every listed event must exist (else 400, nothing started); returns the started ids.
        """
        requests = body.get("StartRequests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise StateError('the body must be {"StartRequests": [{"EventId": "..."}]}')
        ids: list[str] = []
        for item in requests:
            event_id = item.get("EventId") if isinstance(item, dict) else None
            if not isinstance(event_id, str):
                raise StateError(f"each StartRequests entry needs an EventId string, got {item!r}")
            if not any(e["EventId"] == event_id for e in self.events):
                raise StateError(f"unknown EventId {event_id!r}")
            ids.append(event_id)
        return [event_id for event_id in ids if self.start(event_id)]

    def start_due(self, now_wall: float) -> list[str]:
        """Start the Scheduled events whose NotBefore has passed; returns their ids."""
        due = []
        for event in self.events:
            if event["EventStatus"] != "Scheduled" or not event["NotBefore"]:
                continue
            try:
                when = parsedate_to_datetime(event["NotBefore"]).timestamp()
            except (TypeError, ValueError):
                continue
            if when <= now_wall:
                due.append(event["EventId"])
        for event_id in due:
            self.start(event_id)
        return due
