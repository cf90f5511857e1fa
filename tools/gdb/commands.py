"""The stub's command dispatcher: one packet from gdb in, a reply or a resume action out, against a target that answers for the machine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tools.gdb import target as tdesc
from tools.gdb.packets import ProtocolError, parse_int, unhex

PACKET_SIZE = 0x4000
MAX_MEMORY_READ = PACKET_SIZE // 2 - 16
ANY_THREAD, ALL_THREADS = 0, -1
SUPPORTED = (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;vContSupported+").encode()
ERROR_BAD = b"E01"                      # a malformed packet
ERROR_MEMORY = b"E14"                   # EFAULT: the address does not translate
ERROR_THREAD = b"E02"                   # no such thread
ERROR_REFUSED = b"E03"                  # the target refused (a register it cannot take, too many breakpoints)


@dataclass(frozen=True)
class Resume:
    """gdb lets the machine run: `step` is the LP to single-step (None: continue)."""

    step: int | None


@dataclass(frozen=True)
class Detach:
    kill: bool = False


class Target(Protocol):
    def thread_ids(self) -> list[int]: ...
    def thread_name(self, thread: int) -> str: ...
    def stopped_thread(self) -> int: ...
    def stop_reply(self) -> bytes: ...
    def registers(self, thread: int) -> tdesc.RegisterAccess: ...
    def read_memory(self, thread: int, address: int, length: int) -> bytes | None: ...
    def write_memory(self, thread: int, address: int, data: bytes) -> bool: ...
    def set_breakpoint(self, kind: int, address: int, insert: bool) -> bool: ...
    def monitor(self, command: str) -> str: ...


class Dispatcher:
    """Keeps the threads gdb selected (Hg, Hc) and answers each packet (docs/gdb.md lists them)."""

    def __init__(self, machine_target: Target):
        self.target = machine_target
        self.general_thread = ANY_THREAD
        self.continue_thread = ANY_THREAD

    def _thread(self, selected: int) -> int:
        return self.target.stopped_thread() if selected in (ANY_THREAD, ALL_THREADS) else selected

    def handle(self, data: bytes):
        """The reply (bytes), or a Resume or Detach action."""
        try:
            return self._handle(data)
        except ProtocolError:
            return ERROR_BAD
        except KeyError:                 # a thread the machine does not have
            return ERROR_THREAD

    def _handle(self, data: bytes):
        if not data:
            return b""
        command, rest = data[:1], data[1:]
        if command == b"?":
            return self.target.stop_reply()
        if command == b"q" or command == b"Q":
            return self._query(data)
        if command == b"H":
            return self._select_thread(rest)
        if command == b"T":
            return b"OK" if parse_thread(rest) in self.target.thread_ids() else ERROR_THREAD
        if command == b"g":
            return self.target.registers(self._thread(self.general_thread)).read_all().hex().encode()
        if command == b"G":
            return self._write_registers(unhex(rest))
        if command == b"p":
            number = parse_int(rest)
            if not 0 <= number < len(tdesc.REGISTERS):
                return ERROR_BAD
            return self.target.registers(self._thread(self.general_thread)).read(number).hex().encode()
        if command == b"P":
            number_text, _, value = rest.partition(b"=")
            return self._write_register(parse_int(number_text), unhex(value))
        if command == b"m":
            return self._read_memory(rest)
        if command == b"M":
            return self._write_memory(rest)
        if command in (b"Z", b"z"):
            return self._breakpoint(command == b"Z", rest)
        if command == b"c" or command == b"C":
            return Resume(None)
        if command == b"s" or command == b"S":
            return Resume(self._thread(self.continue_thread))
        if command == b"v":
            return self._verbose(data)
        if command == b"D":
            return Detach()
        if command == b"k":
            return Detach(kill=True)
        return b""

    # --- queries ----------------------------------------------------------------------------------
    def _query(self, data: bytes):
        name, _, argument = data.partition(b":")
        if name == b"qSupported":
            return SUPPORTED
        if name == b"qAttached":
            return b"1"
        if name == b"qC":
            return b"QC%x" % self.target.stopped_thread()
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % thread for thread in self.target.thread_ids())
        if name == b"qsThreadInfo":
            return b"l"
        if data.startswith(b"qThreadExtraInfo,"):
            thread = parse_thread(data[len(b"qThreadExtraInfo,"):])
            if thread not in self.target.thread_ids():
                return ERROR_THREAD
            return self.target.thread_name(thread).encode().hex().encode()
        if name == b"qXfer" and argument.startswith(b"features:read:"):
            return self._features(argument[len(b"features:read:"):])
        if data.startswith(b"qRcmd,"):
            command = unhex(data[len(b"qRcmd,"):]).decode("utf-8", "replace")
            answer = self.target.monitor(command)
            return answer.encode().hex().encode() if answer else b"OK"
        if name == b"qSymbol":
            return b"OK"
        return b""

    def _features(self, argument: bytes) -> bytes:
        annex, _, window = argument.partition(b":")
        if annex != b"target.xml":
            return b"E00"
        offset_text, _, length_text = window.partition(b",")
        offset, length = parse_int(offset_text), parse_int(length_text)
        document = tdesc.target_xml().encode()
        chunk = document[offset:offset + length]
        return (b"l" if offset + length >= len(document) else b"m") + chunk

    def _select_thread(self, rest: bytes) -> bytes:
        kind, thread = rest[:1], parse_thread(rest[1:])
        if thread not in (ANY_THREAD, ALL_THREADS) and thread not in self.target.thread_ids():
            return ERROR_THREAD
        if kind == b"g":
            self.general_thread = thread
        elif kind == b"c":
            self.continue_thread = thread
        else:
            return ERROR_BAD
        return b"OK"

    # --- registers and memory ----------------------------------------------------------------------
    def _write_registers(self, data: bytes) -> bytes:
        try:
            self.target.registers(self._thread(self.general_thread)).write_all(data)
        except Exception:   # noqa: BLE001 - a size gdb got wrong, a value Unicorn refuses (a segment selector)
            return ERROR_REFUSED
        return b"OK"

    def _write_register(self, number: int, value: bytes) -> bytes:
        if not 0 <= number < len(tdesc.REGISTERS):
            return ERROR_BAD
        try:
            self.target.registers(self._thread(self.general_thread)).write(number, value)
        except Exception:   # noqa: BLE001 - as above
            return ERROR_REFUSED
        return b"OK"

    def _read_memory(self, rest: bytes) -> bytes:
        address_text, _, length_text = rest.partition(b",")
        address, length = parse_int(address_text), parse_int(length_text)
        length = min(length, MAX_MEMORY_READ)
        data = self.target.read_memory(self._thread(self.general_thread), address, length)
        return ERROR_MEMORY if data is None else data.hex().encode()

    def _write_memory(self, rest: bytes) -> bytes:
        where, _, data_text = rest.partition(b":")
        address_text, _, length_text = where.partition(b",")
        address, length, data = parse_int(address_text), parse_int(length_text), unhex(data_text)
        if len(data) != length:
            return ERROR_BAD
        ok = self.target.write_memory(self._thread(self.general_thread), address, data)
        return b"OK" if ok else ERROR_MEMORY

    def _breakpoint(self, insert: bool, rest: bytes) -> bytes:
        fields = rest.split(b";")[0].split(b",")
        if len(fields) != 3:
            return ERROR_BAD
        kind, address = parse_int(fields[0]), parse_int(fields[1])
        if kind not in (0, 1):
            return b""                   # watchpoints: not supported
        return b"OK" if self.target.set_breakpoint(kind, address, insert) else ERROR_REFUSED

    # --- vCont ----------------------------------------------------------------------------------------
    def _verbose(self, data: bytes):
        if data == b"vCont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"vCont;"):
            step = None
            for action in data[len(b"vCont;"):].split(b";"):
                verb, _, thread_text = action.partition(b":")
                if verb[:1] in (b"s", b"S"):
                    thread = parse_thread(thread_text) if thread_text else self._thread(self.continue_thread)
                    step = self._thread(thread)
                elif verb[:1] not in (b"c", b"C"):
                    return ERROR_BAD
            return Resume(step)
        if data.startswith(b"vKill"):
            return Detach(kill=True)
        return b""


def parse_thread(text: bytes) -> int:
    """A thread id as gdb writes it: hex, or -1 for all (no multiprocess `p` form)."""
    if text == b"-1":
        return ALL_THREADS
    return parse_int(text)
