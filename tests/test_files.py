"""atomic_write, behind every file the package writes (CodeBook, checkpoints, metrics.json): the
file appears whole or not at all, and a failed write leaves the previous one and no temporary."""
import pytest

from gif_kernels.files import atomic_write


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # readers see the previous file until the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
