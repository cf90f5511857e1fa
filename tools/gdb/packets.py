"""The GDB remote serial protocol's framing: `$data#cs` packets, their checksums and escapes, acknowledgements and the interrupt byte."""
from __future__ import annotations

from dataclasses import dataclass

PACKET_START = ord("$")
CHECKSUM_MARK = ord("#")
ESCAPE = ord("}")
ESCAPE_XOR = 0x20
RUN_LENGTH = ord("*")
ACK = b"+"
NACK = b"-"
INTERRUPT = 0x03                        # Ctrl-C: stop the running target
ESCAPED = frozenset(b"$#}*")
CHECKSUM_DIGITS = 2
MAX_PACKET = 64 * 1024                  # a client that sends more without a '#' is talking nonsense


class ProtocolError(ValueError):
    """Bytes that are no packet of the protocol."""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in ESCAPED:
            out += bytes((ESCAPE, byte ^ ESCAPE_XOR))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    index = 0
    while index < len(data):
        byte = data[index]
        if byte == ESCAPE:
            if index + 1 >= len(data):
                raise ProtocolError("a packet ends inside an escape")
            out.append(data[index + 1] ^ ESCAPE_XOR)
            index += 2
        else:
            out.append(byte)
            index += 1
    return bytes(out)


def frame(data: bytes) -> bytes:
    """`$data#cs` with `data` escaped (a reply never uses run-length encoding)."""
    body = escape(data)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


@dataclass(frozen=True)
class Packet:
    data: bytes


@dataclass(frozen=True)
class Interrupt:
    """The client pressed Ctrl-C."""


@dataclass(frozen=True)
class BadPacket:
    """A packet whose checksum is wrong (the reader answers it with a NACK) or that cannot be read."""

    reason: str


class PacketReader:
    """Cuts a byte stream from the client into packets, interrupts and bad packets; acknowledgements
    are dropped (the stub does not resend)."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        found = []
        while self._buffer:
            first = self._buffer[0]
            if first == INTERRUPT:
                del self._buffer[0]
                found.append(Interrupt())
            elif first != PACKET_START:
                del self._buffer[0]          # '+', '-' and noise between packets
            else:
                end = self._buffer.find(b"#")
                if end < 0:
                    if len(self._buffer) > MAX_PACKET:
                        self._buffer.clear()
                        found.append(BadPacket("a packet longer than the stub takes"))
                    break
                if len(self._buffer) < end + 1 + CHECKSUM_DIGITS:
                    break
                body = bytes(self._buffer[1:end])
                digits = bytes(self._buffer[end + 1:end + 1 + CHECKSUM_DIGITS])
                del self._buffer[:end + 1 + CHECKSUM_DIGITS]
                try:
                    expected = int(digits, 16)
                except ValueError:
                    found.append(BadPacket(f"checksum {digits!r} is not hexadecimal"))
                    continue
                if checksum(body) != expected:
                    found.append(BadPacket(f"checksum {expected:02x} for a packet that sums to {checksum(body):02x}"))
                    continue
                try:
                    found.append(Packet(unescape(body)))
                except ProtocolError as exc:
                    found.append(BadPacket(str(exc)))
        return found


def hex_bytes(data: bytes) -> bytes:
    return data.hex().encode()


def unhex(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not hexadecimal: {text[:32]!r}") from exc


def parse_int(text: bytes) -> int:
    try:
        return int(text, 16)
    except ValueError as exc:
        raise ProtocolError(f"not a hexadecimal number: {text[:32]!r}") from exc
