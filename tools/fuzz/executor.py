"""The machine under fuzzing: one real restart recorded, checkpoints at every message, and each input run from its message's checkpoint and judged."""
from __future__ import annotations

from dataclasses import dataclass, field

from unicorn import x86_const

from emu import dirty, fast
from emu.vmx_defs import PAGE_SIZE
from guests import catalog
from hypervisors import boot, build, layouts, transfer
from hypervisors.timeline import RestartTimeline, Transition
from tools import restart as restart_module
from tools import run as run_module
from tools.fuzz import coverage as coverage_module
from tools.fuzz import fields as fields_module
from tools.fuzz import oracles
from tools.fuzz.inputs import FuzzInput, apply_edits

SETUP_BUDGET = 400_000_000          # instructions the reference restart may take
GUEST_RUN_BUDGET = 4_000_000_000    # instructions guests may take to end after an accepted state
HANG_SLACK = 4                      # an input may take this many times the reference's instructions ...
HANG_BASE = transfer.SERVICE_CALL_BUDGET + 2_000_000   # ... plus one call's timeout and some
EVENTS_FOLLOWED = frozenset({"vmcallr", "vmcallr-return", "restart-phase"})
# With several LPs, guests run on the other LPs during the transfer: which VPs ran (a VM entry or
# exit of their VMCS) while an abort was under way is followed, so that their records, which
# running changes, are left out of what the abort must leave as it was.
TRANSITION_EVENTS = frozenset({"vm-entry", "vm-exit"})
CHAINED_CALLS = (transfer.Call.INVARIANTS, transfer.Call.STATE)
STOP_POINT = "fuzz-point"           # the machine's stop at a message (between runs, call entered)
STOP_DONE = "fuzz-done"             # the transfer has ended: committed or aborted
BOOT_POINT = "boot"                  # the checkpoint before the restart begins: the new image staged, the
                                     # doorbell rung, the service partition not yet booted (a `state` input's message 0)
CALL_NUMBER_MASK = (1 << 64) - 1     # RAX
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
# Old-hypervisor record fields the state target leaves alone: pointers and tables only it uses
# (changed, they break the sender itself, not the transfer).
SENDER_OWN_FIELDS = (".vmcs", ".partition", ".eptp", ".slice_end", ".launched", ".last_run", ".runs", ".exits")
SCHEDULING_FIELDS = {"slice_end", "launched", "last_run", "runs"}   # VP record fields that are the scheduler's, not the guest's


class SetupError(ValueError):
    """The setup cannot be fuzzed: its guests end too early, or its restart does not commit."""


@dataclass(frozen=True)
class Setup:
    """The machine a campaign fuzzes: the restart's two hypervisors, the guests, when it starts."""

    from_hv: str = "hv1"
    to_hv: str = "hv2"
    guests: tuple[str, ...] = ("storm", "hashchain")
    lps: int = 1
    request_at: int = 400_000
    mode: str = "precopy"               # a hot mode of tools.restart.MODES: precopy, stop-and-copy, postcopy

    def as_json(self) -> dict:
        return {"from": self.from_hv, "to": self.to_hv, "guests": list(self.guests), "lps": self.lps,
                "request_at": self.request_at, "mode": self.mode}

    @classmethod
    def from_json(cls, document: dict) -> "Setup":
        return cls(document["from"], document["to"], tuple(document["guests"]), int(document["lps"]),
                   int(document["request_at"]), document.get("mode", "precopy"))


@dataclass
class Result:
    """What one input did."""

    outcome: str                                 # committed, aborted, hang, exception
    replies: list[tuple[int, bool, int]] = field(default_factory=list)   # (call, ok, result) in order
    status: int | None = None                    # restart_status after the transfer
    finding: oracles.Finding | None = None
    changed: bool = False                        # the input changed what the new hypervisor received
    instructions: int = 0
    guest_check_due: bool = False                # committed with a checkable field changed: the guests
                                                 # must be run to their end (`check_guests`) to judge it


@dataclass
class _Run:
    """Per-input state the event callback keeps; the restart's course is its timeline's."""

    fix_digest: bool
    timeline: RestartTimeline
    call: int = 0                                # the inverse hypercall under way
    replies: list = field(default_factory=list)
    before_abort: tuple[bytes, bytes] | None = None   # the guests' records when the abort began
    machine_stop: str | None = None              # the machine stopped for good during the transfer
    foreign_pages: list[int] = field(default_factory=list)
    watch_foreign: bool = True                   # the struck call's writes are judged (foreign-write)
    ran_in_abort: set[int] = field(default_factory=set)   # VMCS addresses of VPs that ran during the abort
    stopped_at_blackout: frozenset[int] = frozenset()    # partitions the old hypervisor had stopped by then

    @property
    def done(self) -> bool:
        """The transfer has ended: committed or aborted."""
        return self.timeline.over

    @property
    def committed(self) -> bool:
        return self.timeline.committed

    @property
    def past_commit(self) -> bool:
        """The new hypervisor took over (DEVIRTUALIZE): no abort any more."""
        return self.timeline.past_commit


class TransferMachine:
    """Boots the setup, runs to the restart's first inverse hypercall, and records a real restart:
    each message as sent, a checkpoint at each message (the new hypervisor about to receive it),
    the digest chain before it. `execute` runs one input from its checkpoint to the end of the
    transfer and judges it."""

    def __init__(self, setup: Setup, coverage: bool = True, check_guests: bool = True):
        self.setup = setup
        self.check_guests = check_guests
        self.stopped_by_old_hypervisor: frozenset[int] = frozenset()    # the last input's (execute)
        build.hypervisor(setup.from_hv), build.hypervisor(setup.to_hv)
        self.booted = boot.boot([catalog.parse(spec) for spec in setup.guests], hypervisor=setup.from_hv,
                                lps=setup.lps)
        self.machine = self.booted.machine
        self.machine.run(max_instructions=setup.request_at)
        if self.machine.stop is not None and self.machine.stop.reason != "instruction-limit":
            raise SetupError(f"the guests ended before instruction {setup.request_at}: restart earlier (--at)")
        self.region = self.booted.service_region
        self.old_image_base = self.booted.image_base
        self.area = self.booted.transfer_area
        self.state: _Run | None = None
        self._vp_spans: list[tuple[int, int]] | None = None
        self._recording: list[tuple[int, bytes]] | None = []
        self.events_followed = EVENTS_FOLLOWED | (TRANSITION_EVENTS if setup.lps > 1 else frozenset())
        self.machine.events.subscribe(self._on_event, self.events_followed)
        image = self.image = build.image(setup.to_hv)
        self.code_range = (self.region, self.region + len(image.code))
        self.receiver_chain = self.region + image.symbol("digest_chain") - image.base
        self.edge_map = fast.ffi.new("uint8_t[]", fast.lib.HHR_EDGE_MAP_SIZE) if coverage else None
        # Blocks of the new hypervisor entered by any input so far (a mark at each block's first byte);
        # during the setup, by the reference restart (in the contexts there are when it is staged).
        self.block_map = fast.ffi.new("uint8_t[]", len(image.code)) if coverage else None
        restart_module.stage(self.booted, setup.to_hv, mode=restart_module.MODES[setup.mode])
        self._arm_coverage()
        self.checkpoints = dirty.Checkpoints(self.machine)
        self.checkpoints.mark(BOOT_POINT)
        self._boot_mark = self.machine.retired
        self._run_to(STOP_POINT, SETUP_BUDGET)
        self.partition_pages = [range(p["memory"] >> PAGE_SHIFT, (p["memory"] + p["memory_size"]) >> PAGE_SHIFT)
                                for p in self.booted.partitions()]     # host pages of each partition's RAM
        self._record_reference()
        # The new hypervisor's data beside its code (its variables share pages with its code): a restore
        # that changes only them keeps the translated code, as long as the block map shows no code run
        # there (checked after every input, `_check_data_ranges`). Without a block map, none is trusted.
        self.data_ranges = coverage_module.data_out_of_reach(image) if self.block_map is not None else []
        self._check_data_ranges()
        self._trust_data_ranges()
        if self.block_map is not None:        # the figures count what inputs enter
            fast.ffi.memmove(self.block_map, bytes(len(image.code)), len(image.code))
        self.reference_guests = (run_module.run(setup.from_hv, list(setup.guests), lps=setup.lps)
                                 .document["guests"] if check_guests else None)
        self.executions = 0

    # --- the reference restart -------------------------------------------------------------------------
    def _record_reference(self) -> None:
        """From the first message on: every message and its checkpoint, then on to the commit."""
        self.messages: list[bytes] = []
        self.calls: list[int] = []
        self.call_lps: list[int] = []       # the LP each call was made on (its service VP runs there)
        self.chain_before: list[bytes] = []
        chain = transfer.STATE_DIGEST_START
        started = self.machine.retired
        self.remaining: list[int] = []
        marks: list[int] = []
        while True:
            call, message, lp = self._recording[-1]
            number = len(self.messages) + 1
            self.messages.append(message)
            self.calls.append(call)
            self.call_lps.append(lp)
            self.chain_before.append(chain)
            if call in CHAINED_CALLS:
                chain = transfer.chain_digest(chain, message)
            self.checkpoints.mark(f"m{number}")
            marks.append(self.machine.retired)
            self.machine.stop = None
            if call == transfer.Call.VERIFY:
                break
            self._run_to(STOP_POINT, SETUP_BUDGET)
        self.state = self._new_run(False)
        self._run_to(STOP_DONE, SETUP_BUDGET)
        if not self.state.committed:
            raise SetupError(f"the reference restart {self.setup.from_hv} -> {self.setup.to_hv} did not commit")
        self.remaining = [self.machine.retired - mark for mark in marks]
        self.boot_remaining = self.machine.retired - self._boot_mark
        self.reference_instructions = self.machine.retired - started
        self.vmcs_messages = [number for number, message in enumerate(self.messages, 1)
                              if any(name.startswith("vmcs[") for name in
                                     (f.name for f in fields_module.message_fields(message)))]
        self._recording = None
        self.state = None

    def _run_to(self, reason: str, budget: int) -> None:
        limit = self.machine.retired + budget
        while self.machine.retired < limit:
            self.machine.stop = None if self.machine.stop is not None and self.machine.stop.reason in (
                "instruction-limit", STOP_POINT, STOP_DONE) else self.machine.stop
            self.machine.run(max_instructions=limit)
            stop = self.machine.stop
            if stop is not None and stop.reason == reason:
                return
            if stop is not None and stop.reason not in ("instruction-limit", STOP_POINT):
                raise SetupError(f"the reference restart did not go through: the machine stopped ({stop.reason})"
                                 + (": the guests ended first; request the restart earlier (--at) or give "
                                    "guests that live longer (--guest)" if stop.reason == "debug-exit" else ""))
        raise SetupError(f"the reference restart did not reach its next step within {budget} instructions")

    def _on_event(self, event) -> None:
        kind = event.kind
        if kind == "vmcallr":
            call = event.data["call"]
            if self._recording is not None:
                header = transfer.TRANSFER_HEADER.unpack(self.machine.ram.read(self.area, transfer.TRANSFER_HEADER.size))
                length = min(header["bytes"], transfer.TRANSFER_AREA_SIZE)
                self._recording.append((call, self.machine.ram.read(self.area, length), event.lp))
                if self.state is None:
                    self.machine.request_stop(STOP_POINT)
                return
            state = self.state
            if state is None:
                return
            state.call = call
            if call == transfer.Call.VERIFY and state.fix_digest:
                # The chain over the messages as the new hypervisor received them: its own, read
                # from its memory (digest.inc computes what transfer.chain_digest does).
                self.machine.ram.write(self.area + transfer.TRANSFER_HEADER.size,
                                       self.machine.ram.read(self.receiver_chain, transfer.STATE_DIGEST_BYTES))
        elif kind == "vmcallr-return" and self.state is not None:
            state = self.state
            if not state.replies and state.watch_foreign and self._recording is None:
                # One LP: only the new hypervisor ran since the checkpoint (and the old one for its
                # exits). Several: what ran on the call's LP, told apart since the checkpoint (`execute`).
                state.foreign_pages = self.foreign_writes(None if self.setup.lps == 1 else
                                                          self.checkpoints.pages.unwatch())
            state.replies.append((state.call, event.data["ok"], event.data["result"]))
        elif kind == "restart-phase" and self.state is not None:
            self.state.timeline.on_event(event)
        elif kind in TRANSITION_EVENTS and self.state is not None and self.state.before_abort is not None:
            self.state.ran_in_abort.add(event.data["vmcs"])

    def _new_run(self, fix_digest: bool, call: int = 0) -> _Run:
        """An input's state, its timeline starting at the restart's phase at the checkpoint."""
        timeline = RestartTimeline(phase=self.machine.io.restart_phase)
        timeline.subscribe(self._on_transition)
        return _Run(fix_digest, timeline, call)

    def _on_transition(self, transition: Transition) -> None:
        if transition.phase == transfer.Phase.BLACKOUT:
            self.state.stopped_at_blackout = self.stopped_partitions()
        if transition.phase == transfer.Phase.ABORTED:
            self.state.before_abort = self.guest_records()
            self.state.ran_in_abort |= self.vps_in_guest_mode()
        if transition.ending is not None:
            self.machine.request_stop(STOP_DONE)

    def stopped_partitions(self) -> frozenset[int]:
        """The partitions the hypervisor in view has stopped (by their place in the boot order)."""
        return frozenset(number for number, partition in enumerate(self.booted.partitions())
                         if partition["state"] == layouts.PARTITION_STOPPED)

    # --- what an abort must leave as it was -------------------------------------------------------------
    def guest_records(self) -> tuple[bytes, bytes]:
        """The old hypervisor's partition and VP records, as they lie in RAM (two reads: taken at
        every abort, compared with `same_guests`)."""
        booted = self.booted
        records = build.hypervisor(self.setup.from_hv).records
        ram = booted.machine.ram
        return (ram.read(booted.partition_base, records.partition.size * len(booted.guests)),
                ram.read(booted.vp_base, records.vp.size * booted.vp_total))

    def same_guests(self, before: tuple[bytes, bytes], after: tuple[bytes, bytes],
                    ran: set[int] | frozenset = frozenset()) -> bool:
        """The two `guest_records` hold the same guests: equal bytes, or equal but for the VP
        records' scheduling fields (compared only when the bytes differ), and but for the VPs whose
        VMCS is in `ran` (and their partitions): they ran meanwhile."""
        return before == after or self.guest_fingerprint(before, ran) == self.guest_fingerprint(after, ran)

    def vps_in_guest_mode(self) -> set[int]:
        """The VMCS addresses of the VPs an LP runs now."""
        return {lp.guest.address for lp in self.machine.lps if lp.guest is not None}

    def guest_fingerprint(self, records_read: tuple[bytes, bytes] | None = None,
                          ran: set[int] | frozenset = frozenset()) -> bytes:
        """The old hypervisor's partition and VP records (`guest_records`, read now unless given):
        what guests are (registers, state, timers), as their bytes (a VP record's scheduling fields
        left out; the records of the VPs whose VMCS is in `ran`, and of their partitions, too)."""
        partitions, vps = records_read if records_read is not None else self.guest_records()
        records = build.hypervisor(self.setup.from_hv).records
        if self._vp_spans is None:            # the byte spans of a VP record's other fields
            self._vp_spans = [(records.vp.offset(name), records.vp.offset(name) + size)
                              for name, size in records.vp.fields if name not in SCHEDULING_FIELDS]
        vp_size, partition_size = records.vp.size, records.partition.size
        starts = range(0, len(vps) - vp_size + 1, vp_size)
        left_out = [start for start in starts if self._vp_field(vps, start, "vmcs") in ran] if ran else []
        ran_partitions = {(self._vp_field(vps, start, "partition") - self.booted.partition_base) // partition_size
                          for start in left_out}
        fingerprint = bytearray()
        for number in range(len(partitions) // partition_size):
            if number not in ran_partitions:
                fingerprint += partitions[number * partition_size:(number + 1) * partition_size]
        for start in starts:
            if start not in left_out:
                for low, high in self._vp_spans:
                    fingerprint += vps[start + low:start + high]
        return bytes(fingerprint)

    def _vp_field(self, vps: bytes, start: int, name: str) -> int:
        layout = build.hypervisor(self.setup.from_hv).records.vp
        offset = start + layout.offset(name)
        return int.from_bytes(vps[offset:offset + layout.field_size(name)], "little")

    def _view_old_hypervisor(self) -> None:
        """The booted view (symbols, records) reads the old hypervisor again: guests run to their end
        after a commit (`run_guests_to_end`) leave it on the new one."""
        self.booted.hypervisor, self.booted.image_base = self.setup.from_hv, self.old_image_base

    def state_fields(self) -> list[fields_module.Field]:
        """The old hypervisor's partition and VP records, field by field, at their addresses."""
        self._view_old_hypervisor()
        booted = self.booted
        records = build.hypervisor(self.setup.from_hv).records
        found = []
        base = booted.partition_base
        for number in range(len(booted.guests)):
            found += fields_module._struct_fields(records.partition, base + number * records.partition.size,
                                                  f"partition[{number}]")
        for record in booted.vp_records():
            found += fields_module._struct_fields(records.vp, record.address, f"vp[{record.number}]")
        return [f for f in found if not f.name.endswith(SENDER_OWN_FIELDS)]

    def read_state(self, address: int, width: int) -> int:
        """The old hypervisor's memory at the first message (where `state` inputs strike by default)."""
        return int.from_bytes(self.checkpoints.read("m1", address, width), "little")

    # --- one input --------------------------------------------------------------------------------------
    def execute(self, fuzz_input: FuzzInput, deep: bool = False) -> Result:
        """Runs `fuzz_input` from its checkpoint to the end of the transfer and judges it. `deep`: the
        guests then run to their end and are compared with the reference, after an abort (of a message
        or VMCS input), and after a commit that a changed checkable field went into (otherwise that
        check is left to the caller: `guest_check_due`)."""
        self.executions += 1
        self.stopped_by_old_hypervisor = frozenset()
        number = self.point_number(fuzz_input)
        self.checkpoints.restore(f"m{number}" if number else BOOT_POINT)
        self.machine.stop = None
        self._view_old_hypervisor()
        self._arm_coverage()
        changed = self._strike(fuzz_input, number)
        self.state = state = self._new_run(fuzz_input.fix_digest, self.calls[number - 1] if number else 0)
        state.watch_foreign = number > 0     # (before the restart begins, guests and the old hypervisor run first)
        if state.watch_foreign and self.setup.lps > 1:   # the call's LP's writes, told apart from the other LPs'
            lp = self.machine.lps[self.call_lps[number - 1]]
            self.checkpoints.pages.watch([lp.root, lp.guest.context], lambda: self.machine.running_lp is lp)
        started = self.machine.retired
        budget = HANG_BASE + HANG_SLACK * (self.remaining[number - 1] if number else self.boot_remaining)
        result = Result("aborted", changed=changed)
        try:
            self._run_until_done(budget)
        except Exception as error:          # the oracle: nothing may escape the machine
            self._check_data_ranges()
            self.state = None
            result.outcome = "exception"
            result.finding = oracles.Finding(oracles.EXCEPTION, f"{type(error).__name__}: {error}".splitlines()[0])
            return result
        self._check_data_ranges()
        # A `state` input changes the old hypervisor's own memory: a guest it then stopped itself before
        # the blackout was lost to that hypervisor, not to the transfer (judged by guest_differences).
        self.stopped_by_old_hypervisor = state.stopped_at_blackout if fuzz_input.target == "state" else frozenset()
        result.instructions = self.machine.retired - started
        result.replies = state.replies
        self.state = None
        if state.machine_stop is not None:
            result.outcome = "machine-stopped"
            if state.past_commit:
                result.finding = oracles.Finding(oracles.GUEST_OUTPUT, f"the machine stopped after the commit: "
                                                                       f"{state.machine_stop}")
            elif fuzz_input.target != "state":      # (a changed old hypervisor may break itself)
                result.finding = oracles.Finding(oracles.LOST_GUEST_STATE, f"the machine stopped before the "
                                                                           f"transfer ended: {state.machine_stop}")
            return result
        if not state.done:
            result.outcome = "hang"
            result.finding = oracles.Finding(oracles.HANG, f"the transfer did not end within {budget} instructions")
            return result
        result.outcome = "committed" if state.committed else "aborted"
        result.status = self.booted.restart_status if not state.committed else transfer.Status.DONE
        result.finding = self._judge(fuzz_input, result, state, number, deep)
        return result

    def point_number(self, fuzz_input: FuzzInput) -> int:
        """The message whose checkpoint the input starts from (0: before the restart begins)."""
        if fuzz_input.target == "state":
            return 0 if fuzz_input.message == 0 else 1
        return self.message_number(fuzz_input.message)

    def message_number(self, message: int) -> int:
        """An input's message number, counted from 1 (negative: from the end)."""
        number = len(self.messages) + 1 + message if message < 0 else message
        if not 1 <= number <= len(self.messages):
            raise ValueError(f"message {message}: this restart has messages 1 to {len(self.messages)} "
                             f"(or -1 to -{len(self.messages)} from the end)")
        return number

    def count_edges_into(self, edge_map) -> None:
        """From the next input on, the block hook counts the new hypervisor's edges into `edge_map`
        (a cffi `uint8_t *` of `HHR_EDGE_MAP_SIZE` counters: another process's shared memory, such
        as AFL++'s coverage map) instead of the machine's own."""
        if self.edge_map is None:
            raise ValueError("this machine counts no coverage")
        self.edge_map = edge_map

    def _arm_coverage(self) -> None:
        edge_map = self.edge_map if self.edge_map is not None else fast.ffi.NULL
        block_map = self.block_map if self.block_map is not None else fast.ffi.NULL
        if self.edge_map is not None:
            fast.ffi.memmove(self.edge_map, bytes(fast.lib.HHR_EDGE_MAP_SIZE), fast.lib.HHR_EDGE_MAP_SIZE)
        for context in self.machine.contexts:
            ctx = context.fast.ctx
            ctx.edge_map = edge_map
            ctx.block_map = block_map
            ctx.edge_low, ctx.edge_high = self.code_range
            ctx.edge_previous = 0

    def _check_data_ranges(self) -> None:
        """Trusts the new hypervisor's data ranges (host-physical) to hold no translated code unless a
        block was entered in one; then none from now on."""
        if self.data_ranges and coverage_module.data_entered(self.image, fast.ffi.buffer(self.block_map),
                                                             self.data_ranges):
            self.data_ranges = []
            self.checkpoints.trust_data_ranges(())

    def _trust_data_ranges(self) -> None:
        offset = self.region - self.image.base
        self.checkpoints.trust_data_ranges([(start + offset, stop + offset) for start, stop in self.data_ranges])

    def _strike(self, fuzz_input: FuzzInput, number: int) -> bool:
        """Makes the input's edits at its checkpoint; True if they change what is received."""
        ram = self.machine.ram
        call_changed = False
        if fuzz_input.call is not None and number > 0:
            call = fuzz_input.call & CALL_NUMBER_MASK
            service_vp = self.machine.lps[self.call_lps[number - 1]].guest.context   # entered at inverse_entry
            service_vp.set_reg(x86_const.UC_X86_REG_RAX, call)
            call_changed = call != self.calls[number - 1]
        if fuzz_input.target == "state":
            before = {}
            for edit in fuzz_input.edits:
                if edit.op == "set" and 0 <= edit.offset and ram.holds(edit.offset, edit.width):
                    before[edit.offset] = ram.read(edit.offset, edit.width)
                    ram.write(edit.offset, (edit.value & ((1 << (8 * edit.width)) - 1)).to_bytes(edit.width, "little"))
            return call_changed or any(ram.read(address, len(old)) != old for address, old in before.items())
        original = self.messages[number - 1]
        message = apply_edits(original, fuzz_input.edits)
        if fuzz_input.fix_length and len(message) >= transfer.TRANSFER_HEADER.size:
            offset = transfer.TRANSFER_HEADER.offset("bytes")
            message[offset:offset + 8] = len(message).to_bytes(8, "little")
        message = message[:transfer.TRANSFER_AREA_SIZE]
        ram.write(self.area, bytes(message))  # what lay after a shortened message stays as the sender left it
        # What is received is as long as the header says, whatever the call: bytes written past that
        # (inserted at or set past the message's end) are never read.
        header = transfer.TRANSFER_HEADER.unpack(ram.read(self.area, transfer.TRANSFER_HEADER.size))
        return call_changed or ram.read(self.area, min(header["bytes"], transfer.TRANSFER_AREA_SIZE)) != original

    def _run_until_done(self, budget: int) -> None:
        limit = self.machine.retired + budget
        while not self.state.done and self.machine.retired < limit:
            if self.machine.stop is not None and self.machine.stop.reason in ("instruction-limit", STOP_POINT):
                self.machine.stop = None
            self.machine.run(max_instructions=limit)
            stop = self.machine.stop
            if stop is not None and stop.reason not in ("instruction-limit", STOP_POINT, STOP_DONE):
                self.state.machine_stop = f"{stop.reason} {stop.report}".strip().splitlines()[0]
                return

    # --- oracles ---------------------------------------------------------------------------------------
    def _judge(self, fuzz_input: FuzzInput, result: Result, state: _Run, number: int,
               deep: bool) -> oracles.Finding | None:
        foreign = state.foreign_pages
        if foreign:
            return oracles.Finding(oracles.FOREIGN_WRITE, f"host page {foreign[0]:#x} of a partition written "
                                                          f"during the transfer ({len(foreign)} pages)")
        if result.outcome == "aborted":
            ran = state.ran_in_abort | self.vps_in_guest_mode() if self.setup.lps > 1 else frozenset()
            if not self.same_guests(state.before_abort, self.guest_records(), ran):
                return oracles.Finding(oracles.LOST_GUEST_STATE, "the abort changed a guest's partition or VP "
                                                                 "record")
            if deep and self.check_guests and fuzz_input.target != "state":
                differences = self.run_guests_to_end(self.setup.from_hv)
                if differences:
                    return oracles.Finding(oracles.LOST_GUEST_STATE, "after the abort: " + "; ".join(differences))
            return None
        if not result.changed:
            return None
        if not fuzz_input.fix_digest and fuzz_input.target != "state":
            return oracles.Finding(oracles.DIGEST_ACCEPTED, f"message {number} changed in flight, digest not "
                                                            f"fixed, and the restart committed")
        if self.check_guests and touches_checkable(fuzz_input, self.messages[max(number, 1) - 1]):
            result.guest_check_due = True
            if deep:
                return self.check_guests_after_commit(fuzz_input)
        return None

    def check_guests_after_commit(self, fuzz_input: FuzzInput) -> oracles.Finding | None:
        """Right after `execute` committed `fuzz_input`: the guests run to their end under the new
        hypervisor; a guest that ends otherwise than in the reference run is a finding."""
        differences = self.run_guests_to_end(self.setup.to_hv)
        if not differences:
            return None
        number = 1 if fuzz_input.target == "state" else self.message_number(fuzz_input.message)
        return oracles.Finding(oracles.GUEST_OUTPUT, f"{fuzz_input.target} {number} accepted with "
                                                     f"{describe_edits(fuzz_input)}; " + "; ".join(differences))

    def foreign_writes(self, written: list[int] | None = None) -> list[int]:
        """Partition pages written since the checkpoint (asked when the struck call returns: with one
        LP, only the new hypervisor has run since), or among the pages `written`."""
        if written is not None:
            return sorted(page for page in written if any(page in pages for pages in self.partition_pages))
        marks = fast.ffi.buffer(self.checkpoints.pages.marks)
        found = []
        for pages in self.partition_pages:
            chunk = bytes(marks[pages.start:pages.stop])
            if chunk.count(0) != len(chunk):
                found += [pages.start + index for index, mark in enumerate(chunk) if mark]
        return found

    def run_guests_to_end(self, hypervisor: str) -> list[str]:
        """The guests run to their end; how they differ from the reference run."""
        if hypervisor == self.setup.to_hv and self.booted.hypervisor != hypervisor:
            self.booted.hypervisor, self.booted.image_base = hypervisor, self.region
        self.machine.stop = None
        result = self.machine.run(max_instructions=self.machine.retired + GUEST_RUN_BUDGET)
        self._check_data_ranges()
        reports = run_module.guest_reports(self.booted)
        contained = frozenset({oracles.POSTCOPY_STOP_REASON}) if self.setup.mode == "postcopy" else frozenset()
        excused = self.stopped_by_old_hypervisor if hypervisor == self.setup.to_hv else frozenset()
        differences = oracles.guest_differences(reports, self.reference_guests, contained, excused)
        if result.stop.reason != "debug-exit":
            differences.insert(0, f"the machine stopped: {result.stop.reason}")
        return differences


def touches_checkable(fuzz_input: FuzzInput, message: bytes) -> bool:
    """Every edit aims at a field the new hypervisor can check (or changes the records' shape): a
    guest that then computes something else is the receiver's fault. An input that also changes a
    trusted value (a register, a partition's state) is not judged so: that change alone may explain it."""
    if not fuzz_input.edits:
        return False
    if fuzz_input.target == "state":
        trusted = transfer.TRUSTED_FIELDS[transfer.VP_RECORD.name] | \
            transfer.TRUSTED_FIELDS[transfer.PARTITION_RECORD.name]
        return all(not (name.startswith("_pad") or name in trusted)
                   for name in (edit.field.split(".")[-1] for edit in fuzz_input.edits))
    current = bytes(message)
    for edit in fuzz_input.edits:          # each edit against the message as the edits before left it
        if edit.op in ("set", "xor"):
            found = fields_module.message_fields(current)
            anchor = next((field for field in found if field.name == edit.at), None) if edit.at else None
            field = fields_module.field_at(found, edit.offset + (anchor.offset if anchor else 0))
            if field is not None and not field.checkable:
                return False
        current = bytes(apply_edits(current, (edit,)))
    return True


def describe_edits(fuzz_input: FuzzInput) -> str:
    parts = []
    for edit in fuzz_input.edits:
        where = edit.field or f"byte {edit.offset}"
        if edit.op == "set":
            parts.append(f"{where} = {edit.value:#x}")
        elif edit.op == "xor":
            parts.append(f"{where} ^= {edit.value:#x}")
        elif edit.op == "insert":
            parts.append(f"{len(edit.data)} bytes inserted at {edit.offset}")
        else:
            parts.append(f"{edit.width} bytes deleted at {edit.offset}")
    if fuzz_input.call is not None:
        parts.append(f"call number {fuzz_input.call:#x}")
    return ", ".join(parts) or "no edit"
