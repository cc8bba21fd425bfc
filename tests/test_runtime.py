"""Process settings: glibc's mmap threshold can be fixed (keeps RSS flat over long forward processes)."""

import platform

import pytest

from anofpdm.runtime import fix_mmap_threshold


def test_mmap_threshold_is_fixed_on_glibc():
    assert platform.libc_ver()[0] == "glibc"  # the machines this project runs on
    assert fix_mmap_threshold() is True


def test_non_positive_threshold_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        fix_mmap_threshold(0)
