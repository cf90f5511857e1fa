"""The corpus directory (one input per file, named by its content's SHA-1, as libFuzzer keeps it) and the findings directory."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tools.fuzz.decoding import decode_any
from tools.fuzz.inputs import FuzzInput


class Corpus:
    """Inputs that reached new code, shared through a directory by every worker."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.entries: list[FuzzInput] = []
        self.names: set[str] = set()

    def load_new(self) -> list[FuzzInput]:
        """Files that appeared since the last look (other workers', or an earlier campaign's), in name order."""
        found = []
        for path in sorted(self.directory.iterdir()):
            if path.name in self.names or not path.is_file():
                continue
            self.names.add(path.name)
            try:
                entry = FuzzInput.decode(path.read_bytes())
            except ValueError:
                continue                      # not ours: another tool's file, or one being written
            self.entries.append(entry)
            found.append(entry)
        return found

    def add(self, entry: FuzzInput) -> bool:
        name = entry.name()
        if name in self.names:
            return False
        self.names.add(name)
        self.entries.append(entry)
        write_whole(self.directory, name, entry.encode())
        return True


def write_whole(directory: Path, name: str, data: bytes) -> None:
    """`directory/name` appears only whole, for the other workers and peers that list it: written
    under a dot name (which every reader skips), then renamed."""
    temporary = directory / f".{name}.tmp"
    temporary.write_bytes(data)
    temporary.rename(directory / name)


def save_finding(directory: Path, kind: str, description: str, setup: dict, entry: FuzzInput) -> Path:
    """A finding as a file `hhr fuzz --replay` runs again exactly."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {"kind": kind, "description": description, "setup": setup, "input": entry.as_json()}
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    path = directory / f"{kind}-{hashlib.sha1(entry.encode()).hexdigest()[:12]}.json"
    path.write_text(text)
    return path


def load_replay(path: Path) -> tuple[dict | None, FuzzInput, str | None]:
    """A finding file (setup, input, kind) or a bare corpus or queue input (no setup, no kind; any
    bytes, as a peer's queue entry is read: `decoding.decode_any`)."""
    data = path.read_bytes()
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and "input" in document:
        return document.get("setup"), FuzzInput.decode(json.dumps(document["input"]).encode()), document.get("kind")
    return None, decode_any(data), None
