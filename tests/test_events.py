"""The machine's event kinds are one typed list (emu.events.EventKind): docs/machine.md 9.1 describes
exactly them, every event a run publishes carries exactly its kind's data, and no other kind exists."""
from __future__ import annotations

import collections
import contextlib
import io
import re
from pathlib import Path

import pytest

from emu import events
from emu.events import EVENT_KINDS, EventKind, EventStream

MANUAL = Path(__file__).resolve().parent.parent / "docs" / "machine.md"
TABLE_ROW = re.compile(r"^\| `([a-z0-9-]+)` \| [^|]+ \| (.*) \|$", re.MULTILINE)
KEY_IN_DATA_COLUMN = re.compile(r"`([a-z_]+)`")


def documented_kinds() -> dict[str, set[str]]:
    text = MANUAL.read_text()
    section = text[text.index("### 9.1 Events"):text.index("### 9.2")]
    return {kind: set(KEY_IN_DATA_COLUMN.findall(data)) for kind, data in TABLE_ROW.findall(section)}


def test_the_manual_lists_every_kind_and_its_data():
    documented = documented_kinds()
    assert set(documented) == EVENT_KINDS
    for kind in EventKind:
        assert documented[kind.value] == set(kind.keys), kind


def test_an_unknown_kind_is_refused():
    stream = EventStream(record=True)
    with pytest.raises(ValueError, match="no such event kind"):
        stream.publish(0, 0, "vm-exits", vmcs=0)
    with pytest.raises(ValueError, match="no such event kind"):
        stream.subscribe(lambda event: None, frozenset({"vm-exit", "vmexit"}))
    stream.publish(0, 0, EventKind.VMXOFF)
    assert stream.events[0].kind == "vmxoff"


def test_every_event_of_runs_and_restarts_carries_its_kinds_data(monkeypatch):
    seen = collections.defaultdict(set)
    publish = EventStream.publish

    def recording_publish(self, time, lp, kind, **data):
        seen[kind].add(frozenset(data))
        return publish(self, time, lp, kind, **data)

    monkeypatch.setattr(events.EventStream, "publish", recording_publish)
    from tools import cli
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["restart", "--mode", "suspend"]) == 0
        cli.main(["run", "--guest", "hostile", "--guest", "hello"])
    assert len(seen) >= 15
    for kind, key_sets in seen.items():
        assert key_sets == {EventKind(kind).keys}, kind
