"""`hhr bench --hypervisor`: every figure is there and means what it says (values are reported, not judged)."""
from __future__ import annotations

from bench import hypervisor_speed
from tools import cli


def test_boot_figure_is_the_first_vm_entry():
    figures = hypervisor_speed.boot_to_first_guest("hv1")
    assert 0 < figures["boot_virtual_time"] < 1_000_000
    assert figures["boot_host_ms"] > 0


def test_mixed_workload_runs_every_guest_to_a_clean_exit():
    figures = hypervisor_speed.mixed_workload("hv1")
    assert figures["mixed_guests_ok"] == figures["mixed_guests"] == len(hypervisor_speed.MIXED_WORKLOAD)
    assert 0 < figures["mixed_guest_instructions"] < figures["mixed_instructions"]
    assert figures["mixed_exits"] > 0


def test_bench_without_a_mode_says_which_exist(capsys):
    assert cli.main(["bench"]) == 2
    assert "--machine or --hypervisor" in capsys.readouterr().err
