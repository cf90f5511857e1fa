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


# --- where the hypervisors' variables live (hypervisors/common/data.inc) ---------------------------

_VARIABLES_MACRO = re.compile(r"^%macro (\w+)_variables\n(.*?)^%endmacro", re.MULTILINE | re.DOTALL)
_LABEL = re.compile(r"^([A-Za-z_]\w*):", re.MULTILINE)
_MARKERS = {"hv_gdt_end", "image_end"}              # ends of a table and of the image, not variables


def _code(path) -> str:
    """A source without comments, %include lines and its own variables macro."""
    text = re.sub(r";.*", "", path.read_text())
    text = re.sub(r"^%include .*$", "", text, flags=re.MULTILINE)
    return _VARIABLES_MACRO.sub("", text)


def _sources():
    common = [path for path in sorted(build.COMMON_SOURCES.glob("*.inc")) if path.name != "data.inc"]
    return common + [build.hypervisor(name).source for name in sorted(build.HYPERVISORS)]


def _users(label: str) -> set[str]:
    pattern = re.compile(rf"(?<![\w.]){re.escape(label)}(?!\w)")
    return {path.name for path in _sources() if pattern.search(_code(path))}


def _own_variables() -> dict[str, str]:
    """Each include's own variables (its NAME_variables macro), with the include's name."""
    found = {}
    for path in build.COMMON_SOURCES.glob("*.inc"):
        for macro, body in _VARIABLES_MACRO.findall(path.read_text()):
            assert f"{macro}.inc" == path.name, f"{path.name} declares {macro}_variables"
            found.update({label: path.name for label in _LABEL.findall(re.sub(r";.*", "", body))})
    return found


def test_each_include_s_own_variables_are_used_by_that_include_only():
    own = _own_variables()
    assert len(own) > 60
    wrong = {label: (include, _users(label)) for label, include in own.items() if _users(label) != {include}}
    assert not wrong, f"variables declared by an include but used elsewhere (or not at all): {wrong}"


def test_data_inc_keeps_only_variables_several_sources_share():
    text = (build.COMMON_SOURCES / "data.inc").read_text()
    shared = set(_LABEL.findall(re.sub(r";.*", "", text))) - _MARKERS
    alone = {label: _users(label) for label in shared if len(_users(label)) < 2}
    assert not alone, f"data.inc variables one source uses: move each to its include's macro: {alone}"
    placed = set(re.findall(r"^(\w+)_variables$", text, re.MULTILINE))
    declared = {include.removesuffix(".inc") for include in _own_variables().values()}
    assert placed == declared, "data.inc places every include's variables macro, and only those"


@pytest.mark.parametrize("name", sorted(build.HYPERVISORS))
def test_every_label_python_reads_is_a_variable_each_hypervisor_defines(name):
    from hypervisors.globals_view import HypervisorGlobals

    data_labels = set(_LABEL.findall((build.COMMON_SOURCES / "data.inc").read_text())) | set(_own_variables())
    image = build.image(name)
    for attribute, label in HypervisorGlobals.labels().items():
        assert label in data_labels, f"HypervisorGlobals.{attribute} reads {label}, which is not a variable"
        assert label in image.symbols, f"{name} does not define {label} (HypervisorGlobals.{attribute})"
