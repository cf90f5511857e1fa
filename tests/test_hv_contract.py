"""The hypervisors' contract with their shared code: the labels each top source provides (hypervisors/common/contract.inc)."""
from __future__ import annotations

import re

import pytest

from hypervisors import build

CALL_OR_ADDRESS = r"(call|jmp)\s+{label}\b|\[rip \+ {label}\]"


def test_the_contract_lists_the_seven_labels_of_the_shared_code():
    assert set(build.provided_labels()) == {"pick_vp", "split_frame_records", "page_taken", "partition_created",
                                            "partition_to_record", "partition_from_record", "panic_message"}


@pytest.mark.parametrize("label,include", sorted(build.provided_labels().items()))
def test_each_label_is_used_by_its_include_and_defined_by_no_shared_file(label, include):
    text = (build.COMMON_SOURCES / include).read_text()
    assert re.search(CALL_OR_ADDRESS.format(label=re.escape(label)), text), f"{include} does not use {label}"
    for shared in build.COMMON_SOURCES.glob("*.inc"):
        assert not re.search(rf"^{re.escape(label)}:", shared.read_text(), re.MULTILINE), \
            f"{shared.name} defines {label}: it is the hypervisor's own"


@pytest.mark.parametrize("name", sorted(build.HYPERVISORS))
def test_every_hypervisor_keeps_the_contract(name):
    build.check_contract(build.hypervisor(name).source)


def test_a_top_source_without_a_label_is_refused_by_name(tmp_path):
    source = build.hypervisor("hv1").source.read_text()
    broken = tmp_path / "hv1.s"
    broken.write_text(re.sub(r"^page_taken:\n    ret\n", "", source, flags=re.MULTILINE))
    with pytest.raises(build.ContractError, match=r"hv1.s does not define page_taken \(called by common/memory.inc\)"):
        build.check_contract(broken)
