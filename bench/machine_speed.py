"""Machine speed, side by side in one run: guest code under the machine against bare Unicorn, VM-exit round trip, fragmented EPT."""
from __future__ import annotations

import json
import platform
import random
import time

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as x86

from bench import compiled_guests, exit_kinds
from hypervisors import bare_monitor
from emu.machine import Machine
from emu.memory import MIB
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import MemoryType

LOOP_ITERATIONS = 20_000_000
LOOP_INSTRUCTIONS_PER_ITERATION = 4
CPUID_EXITS = 5_000
INVERSE_CALLS = 2_000
INVERSE_ENTRY_OFFSET = 3              # the guest's second VMCALL (each is 3 bytes)
INSTRUCTIONS_PER_CALL_BOUND = 100     # far more than a round trip retires: a runaway loop stops
FRAGMENTED_PAGES = 10_240
FRAGMENTED_PASSES = 40
FRAGMENTED_GPA_BASE = 16 * MIB       # guest-physical start of the fragmented region
FRAGMENTED_HPA_BASE = 32 * MIB       # host-physical pool its pages are scattered over
FRAGMENTED_RAM = 128 * MIB
PT_ENTRIES = 512
EPT_FIRST_PT = bare_monitor.EPT_PD + bare_monitor.PAGE_SIZE     # page tables go right after the monitor's EPT PD
SHUFFLE_SEED = 2026
BARE_MEMORY = 16 * MIB
SNAPSHOT_RAM = 64 * MIB
SNAPSHOT_PAUSE = 1_000_000
INVERSE_CALL_ROW = "VMCALLR and its VMCALL (inverse hypercall)"


def loop_source(iterations: int) -> str:
    return f"""
      mov rcx, {iterations}
    spin:
      add rax, rcx
      xor rbx, rax
      dec rcx
      jnz spin
      xor eax, eax
      hlt
    """


def _bare_uc(code: bytes) -> Uc:
    """A plain Unicorn instance with BARE_MEMORY mapped and `code` written at GUEST_CODE."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, BARE_MEMORY, UC_PROT_ALL)
    uc.mem_write(bare_monitor.GUEST_CODE, code)
    return uc


def bare_unicorn(iterations: int, budget: bool) -> float:
    """Guest instructions per second of the same loop on a plain Unicorn instance."""
    code = bare_monitor.assemble(loop_source(iterations), bare_monitor.GUEST_CODE)
    uc = _bare_uc(code)
    instructions = iterations * LOOP_INSTRUCTIONS_PER_ITERATION
    started = time.perf_counter()
    if budget:
        uc.emu_start(bare_monitor.GUEST_CODE, bare_monitor.GUEST_CODE + len(code), count=instructions + 16)
    else:
        uc.emu_start(bare_monitor.GUEST_CODE, bare_monitor.GUEST_CODE + len(code))
    elapsed = time.perf_counter() - started
    return instructions / elapsed


def machine_loop(iterations: int) -> float:
    run = bare_monitor.run_guest(loop_source(iterations))
    return iterations * LOOP_INSTRUCTIONS_PER_ITERATION / run.seconds


# Each side touching the x87/SSE state it shares with the other (docs/machine.md 7.4): the guest
# adds to XMM0 before each CPUID, the monitor moves a register into XMM2 at each exit, so every
# exit and every entry hands the state over.
GUEST_TOUCHES_SSE = "addsd xmm0, xmm1"
MONITOR_TOUCHES_SSE = "movq xmm2, r13"


def exit_round_trip(exits: int, *, shared_state_touched: bool = False) -> float:
    """Host microseconds per CPUID exit handled by the monitor (VMREAD x3, VMWRITE, VMRESUME)."""
    run = bare_monitor.run_guest(f"""
      mov r9, {exits}
    again:
      {GUEST_TOUCHES_SSE if shared_state_touched else ""}
      xor eax, eax
      cpuid
      dec r9
      jnz again
      xor eax, eax
      hlt
    """, monitor_on_exit=MONITOR_TOUCHES_SSE if shared_state_touched else "")
    return run.seconds / exits * 1e6


def inverse_call_round_trip(calls: int, *, fast_transitions: bool = True) -> float:
    """Host microseconds per VMCALLR into a guest whose entry returns at once with VMCALL
    (docs/machine.md 8): the root monitor launches the guest, which exits by VMCALL at once; the
    exit handler then calls into it `calls` times and stops the machine. With the C transition
    loop on or off."""
    guest = bare_monitor.assemble("""
      vmcall
    inverse_entry:
      vmcall
    """, bare_monitor.GUEST_CODE)
    inverse_entry = bare_monitor.GUEST_CODE + INVERSE_ENTRY_OFFSET
    fields = bare_monitor.guest_fields() | {"INVERSE_HYPERCALL_ENTRY": inverse_entry}
    monitor = bare_monitor.monitor_source(fields).replace("    exit_handler:\n", f"""    exit_handler:
      mov r9, {calls}
    call_again:
      mov eax, 1
      vmcallr
      dec r9
      jnz call_again
      xor eax, eax
      out 0xF4, al
""", 1)
    machine = Machine(ram_size=bare_monitor.GUEST_HOST_BASE + bare_monitor.GUEST_RAM + 16 * MIB, lps=1,
                      fast_transitions=fast_transitions)
    machine.ram.write_u32(bare_monitor.VMXON_REGION, CAPS.vmcs_revision_id)
    machine.ram.write_u32(bare_monitor.VMCS_REGION, CAPS.vmcs_revision_id)
    bare_monitor.write_guest_memory(machine, guest)
    machine.load(bare_monitor.MONITOR_CODE, bare_monitor.assemble(monitor, bare_monitor.MONITOR_CODE))
    machine.start(bare_monitor.MONITOR_CODE, [bare_monitor.MONITOR_STACK_TOP])
    started = time.perf_counter()
    result = machine.run(max_instructions=calls * INSTRUCTIONS_PER_CALL_BOUND)
    seconds = time.perf_counter() - started
    if machine.statistics()["inverse_calls_by_number"].get(1) != calls or result.stop.reason != "debug-exit":
        raise RuntimeError(f"the inverse-call loop did not run as built: {result.stop}")
    return seconds / calls * 1e6


def bare_unicorn_hook_round_trip(calls: int) -> float:
    """Host microseconds per CPUID trapped by a Python hook on plain Unicorn, for comparison."""
    code = bare_monitor.assemble(f"mov r9, {calls}\nagain: xor eax, eax\ncpuid\ndec r9\njnz again\nhlt",
                                 bare_monitor.GUEST_CODE)
    uc = _bare_uc(code)
    uc.hook_add(UC_HOOK_INSN, lambda uc, data: 1, None, 1, 0, x86.UC_X86_INS_CPUID)
    started = time.perf_counter()
    uc.emu_start(bare_monitor.GUEST_CODE, bare_monitor.GUEST_CODE + len(code))
    return (time.perf_counter() - started) / calls * 1e6


def fragmented_ept() -> tuple[float, int]:
    """A guest reads one word from each of FRAGMENTED_PAGES 4 KiB pages mapped in shuffled order."""
    source = f"""
      mov r10, {FRAGMENTED_PASSES}
    pass_start:
      mov rsi, {FRAGMENTED_GPA_BASE:#x}
      mov rcx, {FRAGMENTED_PAGES}
    page:
      add rax, [rsi]
      add rsi, {bare_monitor.PAGE_SIZE}
      dec rcx
      jnz page
      dec r10
      jnz pass_start
      xor eax, eax
      hlt
    """

    def map_scattered_pages(machine) -> None:
        host_pages = [FRAGMENTED_HPA_BASE + i * bare_monitor.PAGE_SIZE for i in range(FRAGMENTED_PAGES)]
        random.Random(SHUFFLE_SEED).shuffle(host_pages)
        for index, host_page in enumerate(host_pages):
            table = EPT_FIRST_PT + (index // PT_ENTRIES) * bare_monitor.PAGE_SIZE
            machine.ram.write_u64(table + 8 * (index % PT_ENTRIES),
                                  host_page | bare_monitor.EPT_RWX | (MemoryType.WB << bare_monitor.EPT_MEMORY_TYPE_SHIFT))
        first_pd_index = FRAGMENTED_GPA_BASE // bare_monitor.LARGE_PAGE_SIZE
        for table_index in range((FRAGMENTED_PAGES + PT_ENTRIES - 1) // PT_ENTRIES):
            machine.ram.write_u64(bare_monitor.EPT_PD + 8 * (first_pd_index + table_index),
                                  (EPT_FIRST_PT + table_index * bare_monitor.PAGE_SIZE) | bare_monitor.EPT_RWX)

    run = bare_monitor.run_guest(source, ram_size=FRAGMENTED_RAM, prepare=map_scattered_pages)
    return run.result.instructions / run.seconds, run.result.instructions


def snapshot_and_restore(ram_size: int) -> tuple[float, float]:
    """Host milliseconds to snapshot and to restore a machine paused inside a running guest."""
    run = bare_monitor.run_guest(loop_source(LOOP_ITERATIONS), ram_size=ram_size, max_instructions=SNAPSHOT_PAUSE)
    machine = run.machine
    started = time.perf_counter()
    snapshot = machine.snapshot()
    taken = time.perf_counter() - started
    started = time.perf_counter()
    machine.restore(snapshot)
    restored = time.perf_counter() - started
    return taken * 1e3, restored * 1e3


def measure() -> dict:
    figures = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "bare_unicorn_no_budget_ips": bare_unicorn(LOOP_ITERATIONS, budget=False),
        "bare_unicorn_with_budget_ips": bare_unicorn(LOOP_ITERATIONS, budget=True),
        "machine_guest_ips": machine_loop(LOOP_ITERATIONS),
        "exit_round_trip_us": exit_round_trip(CPUID_EXITS),
        "exit_round_trip_sse_both_us": exit_round_trip(CPUID_EXITS, shared_state_touched=True),
        "bare_unicorn_cpuid_hook_us": bare_unicorn_hook_round_trip(CPUID_EXITS),
        "inverse_call_round_trip_us": inverse_call_round_trip(INVERSE_CALLS),
    }
    round_trips = exit_kinds.measure()
    round_trips[INVERSE_CALL_ROW] = {
        "c_loop_us": figures["inverse_call_round_trip_us"],
        "python_us": inverse_call_round_trip(INVERSE_CALLS, fast_transitions=False)}
    figures["exit_round_trips"] = round_trips
    figures["fragmented_ept_ips"], figures["fragmented_ept_instructions"] = fragmented_ept()
    figures["fragmented_ept_pages"] = FRAGMENTED_PAGES
    figures["snapshot_ms"], figures["restore_ms"] = snapshot_and_restore(SNAPSHOT_RAM)
    figures["snapshot_ram_mib"] = SNAPSHOT_RAM // MIB
    timings = compiled_guests.measure_all()
    figures["compiled_guests"] = None if timings is None else {
        timing.name: {"machine_s": timing.machine_seconds, "bare_unicorn_s": timing.bare_seconds,
                      "ratio_to_bare": timing.ratio} for timing in timings}
    return figures


def report(figures: dict) -> str:
    mips = 1e6
    rows = [
        ("bare Unicorn, no budget", f"{figures['bare_unicorn_no_budget_ips'] / mips:8.0f} M instr/s"),
        ("bare Unicorn, emu_start(count=N)", f"{figures['bare_unicorn_with_budget_ips'] / mips:8.0f} M instr/s"),
        ("guest under the machine (EPT, preemption)", f"{figures['machine_guest_ips'] / mips:8.0f} M instr/s"),
        ("  ratio to bare with budget", f"{figures['machine_guest_ips'] / figures['bare_unicorn_with_budget_ips']:8.2f}"),
        ("  ratio to bare without budget", f"{figures['machine_guest_ips'] / figures['bare_unicorn_no_budget_ips']:8.2f}"),
        ("VM exit round trip (CPUID loop)", f"{figures['exit_round_trip_us']:8.1f} us"),
        ("  the same, guest and root both touching x87/SSE", f"{figures['exit_round_trip_sse_both_us']:8.1f} us"),
        ("bare Unicorn Python CPUID hook", f"{figures['bare_unicorn_cpuid_hook_us']:8.1f} us"),
        ("inverse hypercall round trip (VMCALLR, VMCALL)", f"{figures['inverse_call_round_trip_us']:8.1f} us"),
        ("  ratio to the CPUID exit round trip",
         f"{figures['inverse_call_round_trip_us'] / figures['exit_round_trip_us']:8.2f}"),
        (f"guest over {figures['fragmented_ept_pages']} scattered 4 KiB EPT pages",
         f"{figures['fragmented_ept_ips'] / mips:8.0f} M instr/s"),
        (f"snapshot of the whole machine ({figures['snapshot_ram_mib']} MiB RAM)", f"{figures['snapshot_ms']:8.1f} ms"),
        (f"restore of the whole machine ({figures['snapshot_ram_mib']} MiB RAM)", f"{figures['restore_ms']:8.1f} ms"),
    ]
    if figures.get("compiled_guests") is None:
        rows.append(("gcc-built guests under hv1", "    skipped: gcc is not installed"))
    else:
        for name, timing in figures["compiled_guests"].items():
            rows.append((f"gcc -O2 guest {name}: under hv1 / bare Unicorn",
                         f"{timing['machine_s']:8.2f} s / {timing['bare_unicorn_s']:.2f} s = "
                         f"{timing['ratio_to_bare']:.2f} of bare speed"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + "\n\n" + \
        round_trip_table(figures["exit_round_trips"])


def round_trip_table(round_trips: dict[str, dict[str, float]]) -> str:
    """One row per exit kind: host microseconds per round trip in the C transition loop and on the
    Python path (Machine(fast_transitions=False)), and how many times faster the loop is."""
    header = ("exit round trip, bare monitor", "C loop", "Python", "Python / C")
    rows = [(name, f"{trip['c_loop_us']:.1f} us", f"{trip['python_us']:.1f} us",
             f"{trip['python_us'] / trip['c_loop_us']:.1f}") for name, trip in round_trips.items()]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join(f"{row[0]:<{widths[0]}}  " + "  ".join(f"{cell:>{width}}" for cell, width in
                                                           zip(row[1:], widths[1:])) for row in [header, *rows])


def main(json_path: str | None = None) -> int:
    figures = measure()
    print(report(figures))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
