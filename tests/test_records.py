"""grounding.io.records: repairing a JSON-lines file keeps every complete record."""

from __future__ import annotations

from grounding.io.records import JsonlWriter, read_jsonl, repair_jsonl


def test_repair_keeps_a_complete_last_record_without_newline(tmp_path):
    """A hand-edited file or shards joined with cat end on a whole record with no newline:
    the record stays, its newline is added, and the next append starts a new line."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a"}\n{"image": "b", "detections": []}', encoding="utf-8")
    assert repair_jsonl(path) == 0
    assert path.read_text(encoding="utf-8") == '{"image": "a"}\n{"image": "b", "detections": []}\n'
    assert repair_jsonl(path) == 0
    writer = JsonlWriter(path)
    writer.write({"image": "c"})
    writer.close()
    assert [r["image"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_repair_keeps_a_single_record_file_without_newline(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "ä"}', encoding="utf-8")
    assert repair_jsonl(path) == 0
    assert [r["image"] for r in read_jsonl(path)] == ["ä"]
    assert path.read_bytes().endswith(b"}\n")


def test_repair_cuts_a_tail_that_does_not_parse(tmp_path):
    path = tmp_path / "p.jsonl"
    for tail in ('{"image": "c", "det', '{"image": "c"', "[1, 2]", '{"image": "\xe4'):
        head = '{"image": "a"}\n{"image": "b"}\n'
        data = head.encode() + tail.encode("utf-8")[:-1 if tail.endswith("\xe4") else None]
        path.write_bytes(data)
        assert repair_jsonl(path) == len(data) - len(head.encode()), tail
        assert path.read_text(encoding="utf-8") == head


def test_latest_lines_keeps_each_images_last_line_and_names_the_bad_ones(tmp_path):
    from grounding.io.records import latest_lines

    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "a", "n": 1}\n{"image": "b", "n": 2}\nnot json\n\n'
                    '{"image": "a", "n": 3}\n[1, 2]\n')
    latest, bad = latest_lines(path)
    assert [(k, n, e["n"]) for k, (n, e) in latest.items()] == [("b", 2, 2), ("a", 5, 3)]
    assert [n for n, _ in bad] == [3, 6]
    assert isinstance(bad[0][1], ValueError) and bad[1][1] == [1, 2]
    assert latest_lines(tmp_path / "none.jsonl") == ({}, [])
