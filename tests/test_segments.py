"""The flat segments of hypervisors/segments.py: the descriptors are the SDM's encodings of the access rights they are built from."""
from __future__ import annotations

import pytest

from hypervisors import memory_map, segments

ACCESS_BYTE_SHIFT, FLAGS_SHIFT, FLAGS_OF_ACCESS_RIGHTS = 40, 52, 12   # SDM Vol. 3A 3.4.5, Vol. 3C 25.4.1


def test_the_flat_descriptors_are_the_usual_64_bit_ones():
    assert segments.GUEST_CODE_DESCRIPTOR == 0x00AF_9B00_0000_FFFF
    assert segments.GUEST_DATA_DESCRIPTOR == 0x00CF_9300_0000_FFFF
    assert segments.HV_CODE_DESCRIPTOR == 0x00AF_9A00_0000_FFFF
    assert segments.HV_DATA_DESCRIPTOR == 0x00CF_9200_0000_FFFF


@pytest.mark.parametrize("descriptor,access_rights", [
    (segments.GUEST_CODE_DESCRIPTOR, segments.CODE64_ACCESS_RIGHTS),
    (segments.GUEST_DATA_DESCRIPTOR, segments.DATA_ACCESS_RIGHTS),
    (segments.GUEST_TSS_DESCRIPTOR, segments.TSS64_BUSY_ACCESS_RIGHTS),
    (segments.HV_TSS_DESCRIPTOR_NO_BASE, segments.TSS64_AVAILABLE_ACCESS_RIGHTS),
])
def test_a_descriptor_carries_its_access_rights(descriptor, access_rights):
    access_byte = descriptor >> ACCESS_BYTE_SHIFT & 0xFF
    flags = descriptor >> FLAGS_SHIFT & 0xF
    assert access_byte | flags << FLAGS_OF_ACCESS_RIGHTS == access_rights


def test_the_guest_tss_descriptor_holds_its_base_and_limit_and_the_gdt_ends_with_it():
    base = segments.GUEST_TSS_DESCRIPTOR >> 16 & 0xFF_FFFF | (segments.GUEST_TSS_DESCRIPTOR >> 56) << 24
    assert base == memory_map.GUEST_TSS
    assert segments.GUEST_TSS_DESCRIPTOR & 0xFFFF == segments.TSS64_LIMIT == 0x67
    assert max(segments.GUEST_GDT_ENTRIES) + segments.DESCRIPTOR_BYTES - 1 == segments.GUEST_GDT_LIMIT


def test_a_tss_base_above_16_mib_is_split_across_the_descriptor():
    base = 0x1234_5678
    descriptor = segments.descriptor(base, segments.TSS64_LIMIT, segments.TSS64_BUSY_ACCESS_RIGHTS)
    assert descriptor == 0x1200_8B34_5678_0067
