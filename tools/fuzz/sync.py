"""An AFL++ sync directory as hhr's corpus: this instance's inputs as `OUT/<instance>/queue/id:NNNNNN,...`, the other instances' queues imported as AFL++ imports them (`.synced/` bookkeeping)."""
from __future__ import annotations

import re
import socket
from pathlib import Path

from tools.fuzz import coverage
from tools.fuzz.corpus import write_whole
from tools.fuzz.decoding import decode_any
from tools.fuzz.inputs import FuzzInput

INSTANCE_PREFIX = "hhr"
QUEUE = "queue"
SYNCED = ".synced"               # per peer: the lowest queue id not yet imported (AFL++'s u32, little-endian)
SYNCED_BYTES = 4
QUEUE_ID = re.compile(r"^id:(\d{6,})")     # AFL++ reads the id with "id:%06u"; the rest of the name is free
ID_DIGITS = 6
BLOCKS_FILE = "hhr-blocks-{hypervisor}"   # the instance's block map of that image (`hhr fuzz --report`)
HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")
AFL_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
AFL_INSTANCE_SEPARATOR = "_afl"


def instance_name(host: str | None, index: int) -> str:
    """`hhr-<host>-<n>`: an instance name that carries its host, as AFL++'s distributed sync expects."""
    host = HOST_UNSAFE.sub(".", host or socket.gethostname()).strip(".") or "localhost"
    return f"{INSTANCE_PREFIX}-{host}-{index}"


def afl_instance_name(host: str | None, number: int) -> str:
    """`<host>_afl<n>`: an afl-fuzz instance's name (`-M`/`-S`), as AFL++'s docs/parallel_fuzzing.md
    names them (afl-fuzz takes only letters, digits, `_` and `-`)."""
    host = AFL_NAME_UNSAFE.sub("-", host or socket.gethostname()).strip("-") or "localhost"
    return f"{host}{AFL_INSTANCE_SEPARATOR}{number}"


def queue_id(name: str) -> int | None:
    match = QUEUE_ID.match(name)
    return int(match.group(1)) if match else None


class SyncQueue:
    """The corpus of one instance in an AFL++ sync directory (`-o OUT` of afl-fuzz): what it keeps
    goes into its own `queue/`, and every other directory of OUT that has a `queue/` (AFL++
    instances, other hhr workers, other hosts' instances copied in by a sync script) is a peer
    whose new entries it imports. Same interface as `corpus.Corpus`."""

    def __init__(self, out: Path, instance: str):
        self.out = out
        self.instance = instance
        self.queue = out / instance / QUEUE
        self.synced = out / instance / SYNCED
        self.queue.mkdir(parents=True, exist_ok=True)
        self.synced.mkdir(parents=True, exist_ok=True)
        self.entries: list[FuzzInput] = []
        self.names: set[str] = set()            # content digests of the entries
        self.imported: dict[str, int] = {}      # peer: queue entries read from it (the same input twice is kept once)
        ids = [queue_id(path.name) for path in self.queue.iterdir()]
        self.next_id = max((number for number in ids if number is not None), default=-1) + 1
        self._own_loaded = False

    def load_new(self) -> list[FuzzInput]:
        """Entries not seen before: this instance's own queue the first time (a resumed campaign),
        then each peer's entries from the lowest id not yet imported, in id order."""
        found = []
        if not self._own_loaded:
            self._own_loaded = True
            found += self._take(sorted(self.queue.iterdir()))
        for peer in sorted(self.out.iterdir()):
            if peer.name.startswith(".") or peer.name == self.instance or not (peer / QUEUE).is_dir():
                continue
            first = self._first_unseen(peer.name)
            waiting = sorted((number, path) for path in (peer / QUEUE).iterdir()
                             if not path.name.startswith(".") and (number := queue_id(path.name)) is not None
                             and number >= first and path.is_file())
            if not waiting:
                continue
            found += self._take([path for _, path in waiting])
            self.imported[peer.name] = self.imported.get(peer.name, 0) + len(waiting)
            (self.synced / peer.name).write_bytes((waiting[-1][0] + 1).to_bytes(SYNCED_BYTES, "little"))
        return found

    def _first_unseen(self, peer: str) -> int:
        try:
            return int.from_bytes((self.synced / peer).read_bytes()[:SYNCED_BYTES], "little")
        except OSError:
            return 0

    def _take(self, paths: list[Path]) -> list[FuzzInput]:
        taken = []
        for path in paths:
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                entry = decode_any(path.read_bytes())
            except OSError:
                continue                         # gone since the listing
            name = entry.name()
            if name in self.names:
                continue
            self.names.add(name)
            self.entries.append(entry)
            taken.append(entry)
        return taken

    def add(self, entry: FuzzInput) -> bool:
        """Keeps a new input: `id:NNNNNN,op:hhr-TARGET` in this instance's queue."""
        name = entry.name()
        if name in self.names:
            return False
        self.names.add(name)
        self.entries.append(entry)
        file_name = f"id:{self.next_id:0{ID_DIGITS}d},op:{INSTANCE_PREFIX}-{entry.target}"
        self.next_id += 1
        write_whole(self.queue, file_name, entry.encode())
        return True

    def save_blocks(self, hypervisor: str, block_map: bytes) -> Path:
        """Keeps the blocks entered (merged with what an earlier run of this instance entered) for `--report`."""
        path = self.out / self.instance / BLOCKS_FILE.format(hypervisor=hypervisor)
        maps = [block_map]
        if path.is_file() and path.stat().st_size == len(block_map):
            maps.append(path.read_bytes())
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_bytes(coverage.union_map(maps))
        temporary.rename(path)
        return path


def saved_blocks(out: Path, hypervisor: str) -> list[bytes]:
    """Every instance's saved block map of `hypervisor` in the sync directory `out`."""
    return [path.read_bytes() for path in sorted(out.glob(f"*/{BLOCKS_FILE.format(hypervisor=hypervisor)}"))
            if path.is_file()]

