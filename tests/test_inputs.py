"""pipeline/inputs.py: expanding files, folders, globs and list files; --slice partition."""
from __future__ import annotations

import json
import os

import pytest

from abvid.pipeline.inputs import InputError, expand_inputs, parse_slice, read_list_file, slice_inputs


def _touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


@pytest.fixture
def tree(tmp_path):
    files = [_touch(tmp_path / p) for p in ("v/b.mp4", "v/a.MKV", "v/sub/c.webm", "v/notes.txt", "v/img.jpg")]
    return tmp_path, files


def test_folder_is_recursive_sorted_and_filtered_by_extension(tree):
    root, _ = tree
    got = [it.path for it in expand_inputs([str(root / "v")])]
    assert got == [str(root / "v/a.MKV"), str(root / "v/b.mp4"), str(root / "v/sub/c.webm")]
    assert all(not it.skip_reason for it in expand_inputs([str(root / "v")]))


def test_glob_and_explicit_file_of_any_extension(tree):
    root, _ = tree
    assert [it.path for it in expand_inputs([str(root / "v/*.mp4")])] == [str(root / "v/b.mp4")]
    assert [it.path for it in expand_inputs([str(root / "v/**/*.webm")])] == [str(root / "v/sub/c.webm")]
    # an explicitly named file is an input whatever its extension: the user asked for it
    assert [it.path for it in expand_inputs([str(root / "v/img.jpg")])] == [str(root / "v/img.jpg")]


def test_missing_path_and_empty_glob_are_kept(tmp_path):
    items = expand_inputs([str(tmp_path / "gone.mp4"), str(tmp_path / "none*.mp4")])
    assert [it.path for it in items] == [str(tmp_path / "gone.mp4"), str(tmp_path / "none*.mp4")]


def test_list_files_txt_csv_jsonl_relative_to_the_list(tree):
    root, _ = tree
    (root / "list.txt").write_text("# comment\n\nv/b.mp4\n  v/a.MKV  \n/abs/missing.mp4\n")
    (root / "list.csv").write_text("label,path\ncat,v/b.mp4\ndog,v/sub/c.webm\n")
    (root / "list.jsonl").write_text(json.dumps({"path": "v/a.MKV"}) + "\n\n" + json.dumps({"path": "x.mp4"}) + "\n")
    assert [it.path for it in read_list_file(root / "list.txt")] == [
        str(root / "v/b.mp4"), str(root / "v/a.MKV"), "/abs/missing.mp4"]
    assert [it.path for it in read_list_file(root / "list.csv")] == [str(root / "v/b.mp4"), str(root / "v/sub/c.webm")]
    items = expand_inputs([str(root / "list.jsonl")])
    assert [it.path for it in items] == [str(root / "v/a.MKV"), str(root / "x.mp4")]
    assert items[1].origin == f"{root / 'list.jsonl'}:3"


def test_duplicates_are_kept_as_skipped(tree):
    root, _ = tree
    (root / "list.txt").write_text("v/b.mp4\n")
    items = expand_inputs([str(root / "v"), str(root / "list.txt")])
    dup = [it for it in items if it.skip_reason]
    assert len(items) == 4 and len(dup) == 1 and dup[0].path == str(root / "v/b.mp4")
    assert "duplicate" in dup[0].skip_reason and str(root / "v") in dup[0].skip_reason


@pytest.mark.parametrize("name,content,where", [
    ("l.csv", "file\nx.mp4\n", "l.csv:1"),
    ("l.csv", "path\nx.mp4\n\"\"\n", "l.csv:3"),
    ("l.jsonl", '{"path": "a.mp4"}\n{"path": 3}\n', "l.jsonl:2"),
    ("l.jsonl", '{"path": "a.mp4"}\nnot json\n', "l.jsonl:2"),
])
def test_malformed_list_files_name_file_and_line(tmp_path, name, content, where):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=where.replace(".", r"\.")):
        expand_inputs([str(tmp_path / name)])


def test_unreadable_list_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(InputError, match="cannot read list file"):
        expand_inputs([str(tmp_path / "bad.txt")])


def test_slices_cover_every_input_exactly_once_and_are_stable(tmp_path):
    items = expand_inputs([str(tmp_path / f"v{i:03d}.mp4") for i in range(100)])
    for n in (1, 3, 7):
        parts = [slice_inputs(items, i, n) for i in range(n)]
        flat = sorted(it.path for p in parts for it in p)
        assert flat == sorted(it.path for it in items)
        assert all(parts), "with 100 inputs every slice gets some"
    # adding inputs never moves an existing one to another slice
    more = expand_inputs([str(tmp_path / f"v{i:03d}.mp4") for i in range(150)])
    assert {it.path for it in slice_inputs(items, 1, 4)} <= {it.path for it in slice_inputs(more, 1, 4)}


@pytest.mark.parametrize("spec", ["1", "a/b", "4/4", "-1/4", "0/0"])
def test_parse_slice_rejects_bad_specs(spec):
    with pytest.raises(InputError, match="--slice"):
        parse_slice(spec)
    assert parse_slice("3/8") == (3, 8)


def test_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["rel.mp4"])[0].path == os.path.join(str(tmp_path), "rel.mp4")


def test_list_files_stream_line_by_line(tmp_path):
    """A list file is read as items are consumed (a million-line list is never held at once)."""
    from abvid.pipeline.inputs import iter_inputs
    for name, good, more, bad in (("l.txt", "a.mp4\n", "b.mp4\n", b"\xff\n"),
                                  ("l.jsonl", '{"path": "a.mp4"}\n', '{"path": "b.mp4"}\n', b"{oops\n"),
                                  ("l.csv", "path\na.mp4\n", "b.mp4\n", b",,\n")):
        (tmp_path / name).write_bytes((good + more * 30000).encode() + bad)   # the bad line ~200 KB in
        it = iter_inputs([str(tmp_path / name)])
        assert next(it).path == str(tmp_path / "a.mp4")     # the first entry comes before the bad line is read
        with pytest.raises(InputError, match=name):
            list(it)
