"""Atomic writes: the old file or the new one, never part of one, and no leftovers."""

import pytest

from anofpdm.atomic import atomic_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_writers_of_one_file_at_once_each_get_their_own_temporary(tmp_path):
    target = tmp_path / "network.torchscript"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block ends last: its file replaces the inner one's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network.torchscript"]
