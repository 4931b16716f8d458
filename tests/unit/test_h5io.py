"""Atomic outputs: nothing complete-looking on failure, and no litter from killed writers."""

from pathlib import Path

import pytest

from saeflow.h5io import atomic_path


def test_a_failed_block_leaves_the_old_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "table.csv"
    out.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "acts.h5"
    (tmp_path / ".acts.h5.tmp-999999").write_bytes(b"half-written by a process killed with -9")
    (tmp_path / ".acts.h5.tmp-999998").mkdir()  # a directory output (an SAE folder)
    (tmp_path / ".other.h5.tmp-999999").write_bytes(b"another output's: not ours to remove")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.h5.tmp-999999", "acts.h5"]
    assert out.read_bytes() == b"done"
