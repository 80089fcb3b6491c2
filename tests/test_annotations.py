"""pipeline/annotations.py: reading CSV/JSONL side files, matching videos, overlap queries, errors."""
from __future__ import annotations

import json

import pytest

from abvid.pipeline.annotations import Annotation, AnnotationError, load_annotations, overlapping


def test_csv_matches_by_path_name_stem_and_relative_path(tmp_path):
    (tmp_path / "sub").mkdir()
    video = tmp_path / "sub" / "cat_001.mp4"
    f = tmp_path / "ann.csv"
    f.write_text("video,start_s,end_s,label\n"
                 f"{video},0,1,abs\n"
                 "cat_001.mp4,1,2,name\n"
                 "cat_001,2,3,stem\n"
                 "sub/cat_001.mp4,3,4,relative\n"
                 "dog_002.mp4,0,9,other\n")
    ann = load_annotations(f)
    assert len(ann) == 5
    assert [a.label for a in ann.for_video(str(video))] == ["abs", "name", "stem", "relative"]
    assert ann.for_video(str(tmp_path / "elsewhere.mp4")) == []


def test_jsonl_with_text_and_label(tmp_path):
    f = tmp_path / "ann.jsonl"
    f.write_text(json.dumps({"video": "a", "start_s": 0.5, "end_s": 2, "text": "a cat jumps"}) + "\n\n"
                 + json.dumps({"video": "a", "start_s": 0, "end_s": 1, "label": "cat"}) + "\n")
    rows = load_annotations(f).for_video("/x/a.mp4")
    assert [r.to_json() for r in rows] == [{"start_s": 0.0, "end_s": 1.0, "label": "cat"},
                                           {"start_s": 0.5, "end_s": 2.0, "text": "a cat jumps"}]


def test_overlap_is_half_open():
    rows = [Annotation(0, 1, "a"), Annotation(1, 2, "b"), Annotation(5, 5, "point"), Annotation(0, 10, "all")]
    assert [a.label for a in overlapping(rows, 0.5, 1.0)] == ["a", "all"]
    assert [a.label for a in overlapping(rows, 1.0, 1.5)] == ["b", "all"]
    assert [a.label for a in overlapping(rows, 4.0, 6.0)] == ["point", "all"]
    assert [a.label for a in overlapping(rows, 11, 12)] == []


@pytest.mark.parametrize("body,line,msg", [
    ("video,start_s,end_s,label\na.mp4,zero,1,cat\n", 2, "not a number"),
    ("video,start_s,end_s,label\na.mp4,0,1,cat\na.mp4,3,2,cat\n", 3, "before start_s"),
    ("video,start_s,end_s,label\na.mp4,0,1,\n", 2, "neither 'label' nor 'text'"),
    ("video,start_s,end_s,label\n,0,1,cat\n", 2, "'video'"),
    ("video,start_s,end_s,label\na.mp4,0,1,cat,extra\n", 2, "cells"),
    ("video,start_s,end_s,label\na.mp4,-1,1,cat\n", 2, ">= 0"),
    ("video,start,end,label\na.mp4,0,1,cat\n", 1, "header"),
])
def test_malformed_csv_names_file_and_line(tmp_path, body, line, msg):
    f = tmp_path / "ann.csv"
    f.write_text(body)
    with pytest.raises(AnnotationError, match=rf"ann\.csv:{line}: .*{msg}"):
        load_annotations(f)


def test_malformed_jsonl_and_unreadable_files(tmp_path):
    f = tmp_path / "ann.jsonl"
    f.write_text('{"video": "a", "start_s": 0, "end_s": 1, "label": "x"}\n[1, 2]\n')
    with pytest.raises(AnnotationError, match=r"ann\.jsonl:2"):
        load_annotations(f)
    f.write_text('{"video": "a", "start_s": 0, "end_s": 1, "label": "x"}\n{oops\n')
    with pytest.raises(AnnotationError, match=r"ann\.jsonl:2: not valid JSON"):
        load_annotations(f)
    with pytest.raises(AnnotationError, match="cannot read"):
        load_annotations(tmp_path / "missing.csv")
    (tmp_path / "ann.xml").write_text("<a/>")
    with pytest.raises(AnnotationError, match="unknown annotation file type"):
        load_annotations(tmp_path / "ann.xml")
