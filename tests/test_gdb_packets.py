"""The GDB stub's packet layer and dispatcher, without a machine: framing, checksums, escapes, bad input, and each command against a fake target."""
from __future__ import annotations

import pytest

from tools.gdb import commands, packets, target
from tools.gdb.commands import Detach, Dispatcher, Resume
from tools.gdb.packets import BadPacket, Interrupt, Packet, PacketReader


def test_checksum_and_frame():
    assert packets.checksum(b"OK") == 0x9A
    assert packets.frame(b"OK") == b"$OK#9a"


def test_escapes_round_trip():
    data = b"a$b#c}d*e"
    escaped = packets.escape(data)
    assert b"$" not in escaped and b"#" not in escaped
    assert packets.unescape(escaped) == data


def test_reader_cuts_packets_acks_and_interrupts():
    reader = PacketReader()
    stream = b"+" + packets.frame(b"qSupported:xmlRegisters=i386") + b"\x03" + packets.frame(b"g")
    items = reader.feed(stream[:7]) + reader.feed(stream[7:])
    assert items == [Packet(b"qSupported:xmlRegisters=i386"), Interrupt(), Packet(b"g")]


def test_reader_flags_a_wrong_checksum_and_goes_on():
    items = PacketReader().feed(b"$g#00" + packets.frame(b"?"))
    assert isinstance(items[0], BadPacket) and "checksum" in items[0].reason
    assert items[1] == Packet(b"?")


def test_reader_flags_a_non_hex_checksum_and_an_endless_packet():
    assert isinstance(PacketReader().feed(b"$g#zz")[0], BadPacket)
    items = PacketReader().feed(b"$" + b"a" * (packets.MAX_PACKET + 10))
    assert isinstance(items[0], BadPacket)


class FakeTarget:
    def __init__(self):
        self.memory = {0x1000 + n: n for n in range(16)}
        self.breakpoints = set()

    def thread_ids(self):
        return [1, 2]

    def thread_name(self, thread):
        return f"lp{thread - 1} hv1@root"

    def stopped_thread(self):
        return 2

    def stop_reply(self):
        return b"T05thread:2;"

    def registers(self, thread):
        raise AssertionError("not used here")

    def read_memory(self, thread, address, length):
        data = bytes(self.memory[a] for a in range(address, address + length) if a in self.memory)
        return data or None

    def write_memory(self, thread, address, data):
        if address not in self.memory:
            return False
        for offset, byte in enumerate(data):
            self.memory[address + offset] = byte
        return True

    def set_breakpoint(self, kind, address, insert):
        (self.breakpoints.add if insert else self.breakpoints.discard)(address)
        return True

    def monitor(self, command):
        return f"said {command}\n"


@pytest.fixture
def dispatcher():
    return Dispatcher(FakeTarget())


def test_supported_threads_and_unknown(dispatcher):
    assert b"qXfer:features:read+" in dispatcher.handle(b"qSupported:multiprocess+")
    assert dispatcher.handle(b"vMustReplyEmpty") == b""
    assert dispatcher.handle(b"qfThreadInfo") == b"m1,2"
    assert dispatcher.handle(b"qsThreadInfo") == b"l"
    assert dispatcher.handle(b"qC") == b"QC2"
    assert bytes.fromhex(dispatcher.handle(b"qThreadExtraInfo,1").decode()) == b"lp0 hv1@root"
    assert dispatcher.handle(b"qThreadExtraInfo,9") == commands.ERROR_THREAD
    assert dispatcher.handle(b"Hg2") == b"OK" and dispatcher.handle(b"Hg7") == commands.ERROR_THREAD
    assert dispatcher.handle(b"?") == b"T05thread:2;"


def test_memory_reads_writes_and_errors(dispatcher):
    assert dispatcher.handle(b"m1002,4") == b"02030405"
    assert dispatcher.handle(b"m9000,4") == commands.ERROR_MEMORY
    assert dispatcher.handle(b"M1000,2:aabb") == b"OK"
    assert dispatcher.handle(b"m1000,2") == b"aabb"
    assert dispatcher.handle(b"M1000,3:aabb") == commands.ERROR_BAD
    assert dispatcher.handle(b"mzz,4") == commands.ERROR_BAD
    assert dispatcher.handle(b"M1000,1:zz") == commands.ERROR_BAD


def test_target_description_in_pieces(dispatcher):
    document = target.target_xml().encode()
    first = dispatcher.handle(b"qXfer:features:read:target.xml:0,64")
    assert first[:1] == b"m" and first[1:] == document[:100]
    last = dispatcher.handle(b"qXfer:features:read:target.xml:%x,%x" % (100, len(document)))
    assert last[:1] == b"l" and first[1:] + last[1:] == document
    assert b"i386:x86-64" in document and b'name="cr3"' in document and b'name="efer"' in document


def test_resume_detach_breakpoints_and_monitor(dispatcher):
    assert dispatcher.handle(b"c") == Resume(None)
    assert dispatcher.handle(b"vCont;s:1;c") == Resume(1)
    assert dispatcher.handle(b"vCont;c") == Resume(None)
    assert dispatcher.handle(b"vCont;x") == commands.ERROR_BAD
    assert dispatcher.handle(b"vCont?").startswith(b"vCont;c")
    assert dispatcher.handle(b"D") == Detach()
    assert dispatcher.handle(b"Z0,2013a4,1") == b"OK"
    assert 0x2013A4 in dispatcher.target.breakpoints
    assert dispatcher.handle(b"z0,2013a4,1") == b"OK" and not dispatcher.target.breakpoints
    assert dispatcher.handle(b"Z2,1000,4") == b""          # watchpoints: not offered
    assert dispatcher.handle(b"Z0,zz") == commands.ERROR_BAD
    reply = dispatcher.handle(b"qRcmd," + b"phase".hex().encode())
    assert bytes.fromhex(reply.decode()) == b"said phase\n"


def test_the_g_packet_has_one_size():
    assert target.G_PACKET_BYTES == sum(register.bits for register in target.REGISTERS) // 8
    names = [register.name for register in target.REGISTERS]
    for name in ("rax", "rip", "eflags", "cs", "st0", "fop", "xmm15", "mxcsr", "fs_base", "gs_base",
                 "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        assert name in names


def test_random_packets_against_a_real_machine_get_replies_and_never_raise():
    import random

    from guests import catalog
    from hypervisors import boot
    from tools.gdb.control import GdbStub
    from tools.gdb.server import GdbServer

    server = GdbServer("127.0.0.1", 0)
    stub = GdbStub(server)
    try:
        stub.attach(boot.boot([catalog.parse("hello")], hypervisor="hv1", lps=2))
        generator = random.Random(14)
        verbs = [b"g", b"G", b"p", b"P", b"m", b"M", b"Z0,", b"z1,", b"Z2,", b"H", b"Hg", b"T", b"qRcmd,",
                 b"qThreadExtraInfo,", b"qXfer:features:read:target.xml:", b"vCont;", b"?", b"qC", b"q", b"v"]
        for _ in range(2000):
            tail = bytes(generator.choice(b"0123456789abcdef,:;=-xyz") for _ in range(generator.randrange(12)))
            answer = stub.dispatcher.handle(generator.choice(verbs) + tail)
            assert isinstance(answer, (bytes, Resume, Detach))
        assert stub.dispatcher.handle(b"qRcmd," + b"vmcs lp7".hex().encode()) != b""
        assert stub.dispatcher.handle(b"Hg3") == commands.ERROR_THREAD
        assert stub.dispatcher.handle(b"p3e8") == commands.ERROR_BAD
    finally:
        stub.finish()
