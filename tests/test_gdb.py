"""The GDB stub driven by the real gdb (and by raw sockets for what gdb never sends): registers and CR3 in root and in a guest, breakpoints, steps, a restart, bad packets, a second client, a dropped connection, and a run that is the same with gdb as without."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from guests import catalog
from hypervisors import boot, build
from hypervisors.memory_map import GUEST_LOAD_ADDRESS
from tools.gdb import packets

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (.ci/run installs it)")
GDB_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_hhr(*arguments: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", *arguments, "--json", "--gdb", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:                 # the stub says when it listens
        if "waiting for gdb" in line:
            break
    return process, port


def without_gdb(*arguments: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tools.cli", *arguments, "--json"], capture_output=True, text=True,
                          timeout=GDB_SECONDS)
    return json.loads(done.stdout)


def gdb(port: int, *commands: str) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=GDB_SECONDS)
    return done.stdout + done.stderr


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=GDB_SECONDS)
    assert "Traceback" not in err, err
    return json.loads(out)


def comparable(document: dict) -> dict:
    """A run's report without host time."""
    return {key: value for key, value in document.items() if key != "host_seconds"}


def test_the_first_stop_is_before_the_first_instruction_with_root_registers():
    process, port = start_hhr("run", "--guest", "hello")
    entry = build.image("hv1").symbol(build.hypervisor("hv1").entry_symbol)
    out = gdb(port, "info threads", "info registers rip cr0 cr3 cr4 efer", "p/x $fs_base", "p $xmm0.uint128",
              "x/2xb $pc", "continue")
    assert f"rip            {entry:#x}" in out
    assert "(lp0 hv1@root)" in out
    assert "cr3            0x1000" in out and "efer           0xd00" in out and "cr0            0x80010033" in out
    assert "exited normally" in out
    assert comparable(finish(process)) == comparable(without_gdb("run", "--guest", "hello"))


def test_a_breakpoint_in_a_guest_shows_the_guests_own_registers_and_changes_nothing():
    arguments = ("run", "--guest", "hello", "--guest", "sieve", "--lps", "2")
    process, port = start_hhr(*arguments)
    out = gdb(port, f"break *{GUEST_LOAD_ADDRESS:#x}", "continue", "info threads", "info registers rip cr3 cs",
              "x/1i $pc", "continue", "info threads", "delete", "continue")
    assert out.count(f"hit Breakpoint 1, {GUEST_LOAD_ADDRESS:#018x}") == 2
    assert "p0.vp0" in out and "p1.vp0" in out
    assert f"rip            {GUEST_LOAD_ADDRESS:#x}" in out
    assert "exited normally" in out
    assert comparable(finish(process)) == comparable(without_gdb(*arguments))


def test_steps_and_a_breakpoint_at_a_hypervisor_symbol_change_nothing():
    arguments = ("run", "--guest", "hello")
    vm_exit = build.image("hv1").symbol("vm_exit")
    process, port = start_hhr(*arguments)
    out = gdb(port, f"break *{vm_exit:#x}", "continue", "p/x $pc", "stepi", "p/x $pc", "stepi", "p/x $pc",
              "continue", "delete", "continue")
    assert f"$1 = {vm_exit:#x}" in out and f"$2 = {vm_exit + 1:#x}" in out
    assert out.count("Breakpoint 1, ") == 2
    assert comparable(finish(process)) == comparable(without_gdb(*arguments))


def service_region_of(*guests: str, lps: int, at: int) -> int:
    """Where hv1 puts its service region (hv2 runs there during a restart), from a run without gdb."""
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor="hv1", lps=lps)
    booted.machine.run(max_instructions=at)
    return booted.service_region


def machine_facts(document: dict) -> dict:
    """What a run must keep with gdb attached: guests, stop, instructions, virtual time, exits."""
    return {key: document[key] for key in ("guests", "machine_stop", "instructions", "virtual_time",
                                          "exits_by_reason", "instructions_by_lp", "hypervisor_console")} | \
        {"outcomes": [(entry["outcome"], [(vp["blackout_ticks"], vp["vp"]) for vp in entry["blackout"]["per_vp"]],
                       [(phase["phase"], phase["virtual_ticks"]) for phase in entry["phases"]])
                      for entry in document.get("restarts", [])]}


def symbol_file(tmp_path, image: str, *options: str) -> str:
    path = tmp_path / f"{image}.elf"
    subprocess.run([sys.executable, "-m", "tools.cli", "symbols", image, "-o", str(path), *options], check=True,
                   capture_output=True, timeout=GDB_SECONDS)
    return str(path)


def test_symbols_put_an_images_labels_where_it_runs(tmp_path):
    hv2 = symbol_file(tmp_path, "hv2", "--at", "0xe800000", "--prefix", "hv2_")
    image = build.image("hv2")
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"add-symbol-file {hv2}", "-ex", "info address hv2_receive_vp",
                          "-ex", "info symbol 0xe800000"], capture_output=True, text=True, timeout=GDB_SECONDS).stdout
    assert f"is at {0xe800000 + image.symbol('receive_vp') - image.base:#x}" in out
    hello = symbol_file(tmp_path, "hello")
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"add-symbol-file {hello}", "-ex", "info address start"],
                         capture_output=True, text=True, timeout=GDB_SECONDS).stdout
    assert f"is at {GUEST_LOAD_ADDRESS:#x}" in out
    done = subprocess.run([sys.executable, "-m", "tools.cli", "symbols", "nosuch", "-o", str(tmp_path / "x.elf")],
                          capture_output=True, text=True, timeout=GDB_SECONDS)
    assert done.returncode == 2 and "no image 'nosuch'" in done.stderr


def test_a_break_in_the_new_hypervisor_during_a_restart_and_thread_switching(tmp_path):
    arguments = ("restart", "--lps", "2", "--guest", "heartbeat", "--at", "200000")
    service_region = service_region_of("heartbeat", lps=2, at=200000)
    hv1 = symbol_file(tmp_path, "hv1")
    hv2 = symbol_file(tmp_path, "hv2", "--at", f"{service_region:#x}", "--prefix", "hv2_")
    process, port = start_hhr(*arguments)
    out = gdb(port, "info threads", "thread 2", "p/x $cr3", "thread 1", f"add-symbol-file {hv1}",
              f"add-symbol-file {hv2}", "break hv2_receive_vp", "continue", "monitor where", "info threads",
              "x/2i $pc", "x/4gx $rdi", "stepi", "p/x $pc", "delete", "monitor break phase resumed", "continue",
              "info threads", "monitor break clear", "continue")
    assert "lp1 hv1@root" in out
    assert "hhr: phase resumed:" in out and "(lp0 hv2@root)" in out
    assert f"hv2 (service region) at {service_region:#x}" in out
    assert "hit Breakpoint 1, " in out and "in hv2_receive_vp ()" in out
    assert "hv2@service" in out and "<hv2_receive_vp+3>" in out
    assert "Cannot access memory" not in out
    assert "exited normally" in out
    document = finish(process)
    assert document["restart"]["outcome"] == "committed"
    assert machine_facts(document) == machine_facts(without_gdb(*arguments))


def raw_session(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    return client


def exchange(client: socket.socket, data: bytes, packet: bool = True) -> bytes:
    """Sends `data`; what comes back up to a whole packet (or, not `packet`, the first bytes)."""
    client.sendall(data)
    reply = b""
    while True:
        chunk = client.recv(4096)
        if not chunk:
            return reply
        reply += chunk
        if not packet:
            return reply
        mark = reply.find(b"#", reply.find(b"$"))
        if reply.find(b"$") >= 0 and mark >= 0 and len(reply) >= mark + 3:
            return reply


def test_bad_packets_a_second_client_and_a_dropped_connection_leave_the_machine_running():
    arguments = ("run", "--guest", "hello")
    process, port = start_hhr(*arguments)
    client = raw_session(port)
    assert exchange(client, b"$g#00", packet=False).startswith(b"-")                       # a wrong checksum: NACK
    assert b"$E01#" in exchange(client, packets.frame(b"mzz,4"))             # malformed: an error
    assert b"$#00" in exchange(client, packets.frame(b"qNoSuchThing"))        # unknown: empty
    assert b"E14" in exchange(client, packets.frame(b"m7fff00000000,4"))     # not mapped
    assert b"E14" in exchange(client, packets.frame(b"m8000000000000,4"))    # not canonical
    second = raw_session(port)
    assert b"another gdb" in exchange(second, packets.frame(b"?"))
    second.close()
    assert "another gdb is attached to this machine" in gdb(port, "info threads")   # the real gdb says why
    assert b"T05thread:1;" in exchange(client, packets.frame(b"?"))          # the first client is still served
    client.close()                                                          # dropped while stopped
    document = finish(process)
    assert comparable(document) == comparable(without_gdb(*arguments))
    assert process.returncode == 0


def test_monitor_breaks_on_machine_events_and_reads_the_vmcs_and_ept():
    arguments = ("restart", "--lps", "2", "--guest", "heartbeat", "--at", "200000")
    service_region = service_region_of("heartbeat", lps=2, at=200000)
    process, port = start_hhr(*arguments)
    out = gdb(port, "monitor break vmexit VMCALL", "continue", "monitor vmcs", "monitor events 3",
              "monitor break clear", "monitor break phase commit", "continue", "monitor phase", "monitor where",
              "monitor break clear", "monitor break vmcallr", "continue", "info threads",
              f"monitor ept {service_region:#x}", "monitor ept 0x7000000000", "monitor break clear",
              "monitor nonsense", "continue")
    assert "hhr: vmexit VMCALL:" in out and "reason=VMCALL" in out
    assert "GUEST_RIP" in out and "VM_EXIT_REASON" in out
    assert "hhr: phase commit:" in out and "restart phase COMMIT (6)" in out
    assert "hv2 (service region) at" in out
    assert "hhr: vmcallr:" in out and "hv2@service" in out
    assert f"GPA {service_region:#x} -> HPA {service_region:#x}" in out     # the service partition: identity
    assert "GPA 0x7000000000: EPT violation" in out
    assert "unknown monitor command 'nonsense'" in out
    assert "exited normally" in out
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))


VMXOFF_BYTES = bytes.fromhex("0f01c4")


def vmxoff_address(hypervisor: str) -> int:
    """The first VMXOFF in a hypervisor's image (its bytes, decoded to be sure), where it is assembled to run."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    image = build.image(hypervisor)
    offset = image.code.find(VMXOFF_BYTES)
    while offset >= 0:
        decoded = list(Cs(CS_ARCH_X86, CS_MODE_64).disasm(image.code[offset:offset + 3], image.base + offset))
        if decoded and decoded[0].mnemonic == "vmxoff":
            return image.base + offset
        offset = image.code.find(VMXOFF_BYTES, offset + 1)
    raise AssertionError(f"{hypervisor} has no VMXOFF")


def test_a_step_across_vmxoff_on_one_lp():
    arguments = ("restart", "--lps", "2", "--guest", "heartbeat", "--at", "200000")
    vmxoff = vmxoff_address("hv1")
    process, port = start_hhr(*arguments)
    out = gdb(port, f"break *{vmxoff:#x}", "continue", "p/x $pc", "x/1i $pc", "stepi", "p/x $pc", "delete",
              "continue")
    assert f"$1 = {vmxoff:#x}" in out and "vmxoff" in out
    assert f"$2 = {vmxoff + 3:#x}" in out
    assert "exited normally" in out
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))


def test_a_trace_with_breaks_and_steps_is_the_trace_without_gdb(tmp_path):
    # A window that does not begin at the doorbell is found by a first, untraced pass of the same
    # run: the stub follows both machines, and its breaks stop each.
    common = ("trace", "--quiet", "--lps", "2", "--guest", "heartbeat", "--at", "200000", "--from-event", "vmcallr",
              "--to-event", "vmcallr-return", "--format", "jsonl", "--to-end")
    vmxoff = vmxoff_address("hv1")
    port = free_port()
    traced = tmp_path / "with-gdb.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", *common, "-o", str(traced),
                                "--gdb", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "waiting for gdb" in line:
            break
    out = gdb(port, "monitor break vmcallr", "continue", "stepi", "stepi", "continue", "stepi", "monitor break clear",
              f"break *{vmxoff:#x}", "continue", "info threads", "stepi", "delete", "continue")
    assert out.count("hhr: vmcallr:") == 2
    assert f"Breakpoint 1, {vmxoff:#018x}" in out and "exited normally" in out
    process.communicate(timeout=GDB_SECONDS)
    assert process.returncode == 0
    plain = tmp_path / "without.jsonl"
    subprocess.run([sys.executable, "-m", "tools.cli", *common, "-o", str(plain)], check=True, timeout=GDB_SECONDS,
                   capture_output=True)
    assert traced.stat().st_size > 0 and traced.read_bytes() == plain.read_bytes()


def test_ctrl_c_stops_a_running_machine_between_slices_and_the_run_goes_on_unchanged():
    arguments = ("run", "--guest", "heartbeat", "--lps", "2")
    process, port = start_hhr(*arguments)
    client = raw_session(port)
    assert b"$T05thread:1;#" in exchange(client, packets.frame(b"?"))
    client.sendall(packets.frame(b"vCont;c"))
    assert client.recv(1) == b"+"
    client.sendall(bytes((packets.INTERRUPT,)))
    reply = exchange(client, b"")
    assert b"$T02thread:" in reply                                         # SIGINT, the LP about to run
    assert b"$OK#" in exchange(client, packets.frame(b"Hg2"))
    assert len(exchange(client, packets.frame(b"g"))) > 2 * 600
    assert b"$OK#" in exchange(client, packets.frame(b"D"))
    client.close()
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))


def test_breaks_and_steps_reach_instructions_the_machine_carries_out_itself():
    """A guest's IN is never run by Unicorn (it exits, docs/machine.md 7.8.2): a breakpoint on it and a
    step onto it still stop there, and the next step is the exit handler in root."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from tools.trace.symbols import builtin_guest_image
    image = builtin_guest_image("heartbeat")
    instructions = list(Cs(CS_ARCH_X86, CS_MODE_64).disasm(image.code, image.base))
    port_in = next(index for index, instruction in enumerate(instructions) if instruction.mnemonic == "in")
    before, trapped = instructions[port_in - 1].address, instructions[port_in].address
    vm_exit = build.image("hv1").symbol("vm_exit")
    arguments = ("run", "--guest", "heartbeat")
    process, port = start_hhr(*arguments)
    out = gdb(port, f"break *{trapped:#x}", "continue", "p/x $pc", "stepi", "p/x $pc", "delete",
              f"break *{before:#x}", "continue", "stepi", "p/x $pc", "stepi", "p/x $pc", "info threads", "delete",
              "continue")
    assert f"$1 = {trapped:#x}" in out and f"$2 = {vm_exit:#x}" in out
    assert f"$3 = {trapped:#x}" in out and f"$4 = {vm_exit:#x}" in out
    assert "lp0 hv1@root" in out and "exited normally" in out
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))


def test_a_client_may_come_back_after_detaching_and_kill_stops_the_machine():
    arguments = ("restart",)
    process, port = start_hhr(*arguments)
    client = raw_session(port)
    assert b"$OK#" in exchange(client, packets.frame(b"D"))
    client.close()
    out = gdb(port, "info threads", "continue")       # the machine stops for it at the next slice
    assert "Thread 2 (lp1" in out and "exited normally" in out
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))
    process, port = start_hhr("run", "--guest", "heartbeat")
    out = gdb(port, "stepi", "kill")
    document = finish(process)
    assert document["machine_stop"]["reason"] == "killed" and process.returncode == 1


def test_registers_and_memory_are_written_in_the_stopped_context():
    process, port = start_hhr("run", "--guest", "hello")
    out = gdb(port, f"hbreak *{GUEST_LOAD_ADDRESS:#x}", "continue", "set $rax = 0x1234", "p/x $rax",
              "set $xmm3.v2_int64[0] = 0x5566", "p/x $xmm3.v2_int64[0]", "p/x $cr2",
              "set *(unsigned long *)($rsp - 64) = 0xfeedface", "x/1gx $rsp - 64", "set *(long *)0x7fff00000000 = 1",
              "thread 1", "p/x $pc", "delete", "continue")
    assert "Hardware assisted breakpoint 1" in out
    assert "$1 = 0x1234" in out and "$2 = 0x5566" in out and "$3 = 0x" in out
    assert "0x00000000feedface" in out
    assert "Cannot access memory at address 0x7fff00000000" in out
    assert f"$4 = {GUEST_LOAD_ADDRESS:#x}" in out
    finish(process)


def test_a_stop_at_a_breakpoint_says_which_kind():
    arguments = ("run", "--guest", "hello")
    vm_exit = build.image("hv1").symbol("vm_exit")
    process, port = start_hhr(*arguments)
    client = raw_session(port)
    assert b"$OK#" in exchange(client, packets.frame(b"Z1,%x,1" % GUEST_LOAD_ADDRESS))
    assert b"$T05thread:1;hwbreak:;#" in exchange(client, packets.frame(b"c"))
    assert b"$OK#" in exchange(client, packets.frame(b"z1,%x,1" % GUEST_LOAD_ADDRESS))
    assert b"$OK#" in exchange(client, packets.frame(b"Z0,%x,1" % vm_exit))
    assert b"$T05thread:1;swbreak:;#" in exchange(client, packets.frame(b"vCont;c"))
    assert b"$OK#" in exchange(client, packets.frame(b"z0,%x,1" % vm_exit))
    assert b"$T05thread:1;#" in exchange(client, packets.frame(b"vCont;s:1"))   # a step: no breakpoint
    assert b"$OK#" in exchange(client, packets.frame(b"D"))
    client.close()
    assert comparable(finish(process)) == comparable(without_gdb(*arguments))


def test_a_step_of_an_lp_that_is_not_inside_an_instruction_runs_its_next_one():
    """At the first stop no LP has begun an instruction; at a breakpoint only the LP that hit it has:
    a step of any other LP runs the instruction at its RIP and stops after it."""
    entry = build.image("hv1").symbol(build.hypervisor("hv1").entry_symbol)
    arguments = ("run", "--lps", "2", "--guest", "hello,vps=2")
    process, port = start_hhr(*arguments)
    out = gdb(port, "stepi", "p/x $pc", f"break *{GUEST_LOAD_ADDRESS:#x}", "continue", "delete", "thread 2",
              "stepi", "p/x $pc", "stepi", "p/x $pc", "continue")
    first = next(instruction_lengths(entry))
    assert f"$1 = {entry + first:#x}" in out
    assert f"$2 = {entry + first:#x}" in out and "$3 = 0x" in out and f"$3 = {entry + first:#x}" not in out
    assert "exited normally" in out
    assert comparable(finish(process)) == comparable(without_gdb(*arguments))


def instruction_lengths(address: int):
    """The lengths of hv1's instructions from `address` on."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    image = build.image("hv1")
    for instruction in Cs(CS_ARCH_X86, CS_MODE_64).disasm(image.code[address - image.base:], address):
        yield instruction.size


def test_a_suspend_resets_the_machine_and_gdb_follows_the_new_one():
    arguments = ("restart", "--mode", "suspend")
    process, port = start_hhr(*arguments)
    out = gdb(port, "monitor break phase resuming", "continue", "info threads", "monitor phase",
              "monitor break clear", "continue")
    assert "hhr: phase resuming:" in out and "restart phase RESUMING (12); hv2 is in charge" in out
    assert "(lp0 hv2@root)" in out and "exited normally" in out
    assert machine_facts(finish(process)) == machine_facts(without_gdb(*arguments))


def test_a_lab_monitor_on_the_bare_machine_is_debugged_with_its_own_symbols(tmp_path):
    from tools.lab import book, solving
    directory = solving.start_filled(book.exercise(1), tmp_path / "hhr-lab")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "lab", "run", "1", "--dir", str(tmp_path / "hhr-lab"),
                                "--seed", "5", "--gdb", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "waiting for gdb" in line:
            break
    out = gdb(port, f"add-symbol-file {directory / 'monitor.elf'}", "break lab_done", "continue", "info threads",
              "p/x $cr4", "monitor where", "continue")
    stdout, stderr = process.communicate(timeout=GDB_SECONDS)
    assert "Traceback" not in stderr, stderr
    assert "in lab_done ()" in out and "lp0 monitor@root" in out
    assert "$1 = 0x2620" in out                          # CR4 with VMXE, as exercise 1 leaves it
    assert "monitor on the bare machine at 0x100000" in out
    assert "VMXON succeeded" in stdout and "exit status 1" in stdout
