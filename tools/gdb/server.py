"""The stub's socket: one gdb client at a time on a TCP port; a second client is told so and closed, a dropped one leaves the machine running."""
from __future__ import annotations

import select
import socket
import sys
from typing import IO

from tools.gdb.packets import ACK, NACK, BadPacket, Packet, PacketReader, frame

BUSY_REPLY = b"E.another gdb is attached to this machine: one client at a time"
RECEIVE_BYTES = 65536
REFUSE_WAIT_SECONDS = 2.0
REFUSE_PACKETS = 16                      # a refused client's packets answered before it is closed
REFUSED_SUPPORT = b"PacketSize=1000"


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT`, the host 127.0.0.1 unless given."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--gdb takes [HOST:]PORT, not {text!r}") from None
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"--gdb: port {number} is out of range")
    return host or "127.0.0.1", number


class ConnectionLost(Exception):
    """The client went away."""


class GdbServer:
    def __init__(self, host: str, port: int, log: IO[str] = sys.stderr):
        self.log = log
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(2)
        self.client: socket.socket | None = None
        self.reader = PacketReader()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    @property
    def connected(self) -> bool:
        return self.client is not None

    def accept(self, block: bool) -> bool:
        """Takes a waiting client (waits for one if `block`); True if one is connected now."""
        if self.client is not None:
            return True
        if not block and not select.select([self.listener], [], [], 0)[0]:
            return False
        client, peer = self.listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client, self.reader = client, PacketReader()
        self.log.write(f"hhr gdb: client {peer[0]}:{peer[1]} attached\n")
        return True

    def _refuse_others(self) -> None:
        """A second client is answered, until it asks for the stop reason, with an error that says
        why; then it is closed. The first client goes on."""
        while select.select([self.listener], [], [], 0)[0]:
            other, peer = self.listener.accept()
            self.log.write(f"hhr gdb: refused a second client {peer[0]}:{peer[1]}: one client at a time\n")
            try:
                other.settimeout(REFUSE_WAIT_SECONDS)
                reader = PacketReader()
                for _ in range(REFUSE_PACKETS):
                    data = other.recv(RECEIVE_BYTES)
                    if not data:
                        break
                    packets = [item for item in reader.feed(data) if isinstance(item, Packet)]
                    for packet in packets:
                        reply = REFUSED_SUPPORT if packet.data.startswith(b"qSupported") else \
                            b"" if packet.data == b"vMustReplyEmpty" else BUSY_REPLY
                        other.sendall(ACK + frame(reply))
                    if any(packet.data == b"?" for packet in packets):
                        break
            except OSError:
                pass
            finally:
                other.close()

    def receive(self, block: bool) -> list:
        """What the client sent (packets, interrupts, bad packets); waits for something if `block`.
        Raises ConnectionLost when it is gone."""
        if self.client is None:
            raise ConnectionLost()
        while True:
            self._refuse_others()
            ready = select.select([self.client, self.listener], [], [], None if block else 0)[0]
            if self.client in ready:
                try:
                    data = self.client.recv(RECEIVE_BYTES)
                except OSError:
                    data = b""
                if not data:
                    self.drop("the client closed the connection")
                    raise ConnectionLost()
                items = self.reader.feed(data)
                for item in items:
                    self._acknowledge(item)
                if items or not block:
                    return items
            elif not block:
                return []

    def _acknowledge(self, item) -> None:
        if isinstance(item, Packet):
            self._send_raw(ACK)
        elif isinstance(item, BadPacket):
            self.log.write(f"hhr gdb: bad packet from the client: {item.reason}\n")
            self._send_raw(NACK)

    def send(self, data: bytes) -> None:
        self._send_raw(frame(data))

    def _send_raw(self, data: bytes) -> None:
        if self.client is None:
            raise ConnectionLost()
        try:
            self.client.sendall(data)
        except OSError:
            self.drop("the connection broke")
            raise ConnectionLost() from None

    def drop(self, why: str) -> None:
        if self.client is not None:
            self.log.write(f"hhr gdb: {why}; the machine runs on without gdb\n")
            try:
                self.client.close()
            except OSError:
                pass
        self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.listener.close()
