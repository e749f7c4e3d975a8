"""utils/atomic_files.py: a file appears whole or not at all, and a failed write leaves nothing."""

import pytest

from utils.atomic_files import write_text_atomically


def lines_then_failure():
    yield "first line\n"
    raise OSError("No space left on device")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(path, lines_then_failure(), durable=True)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]


def test_pieces_are_written_in_order_and_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_text_atomically(path, "old")
    write_text_atomically(path, (f"{i}\n" for i in range(3)), durable=True)
    assert path.read_text(encoding="utf-8") == "0\n1\n2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
