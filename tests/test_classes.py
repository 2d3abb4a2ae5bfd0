"""One class-list grammar (reme.classes) for --classes, every --classes-file, benchmark files
and the Python API (issues 13, 14); --paper-form through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, photo
from reme.classes import CLASS_LIST_GRAMMAR, parse_class_lines, parse_class_text, parse_classes, read_class_file
from reme.eval import names as eval_names


def test_one_grammar_for_strings_files_and_sequences(tmp_path):
    assert parse_classes("person; people, car ,  striped   rug") == (
        ["person", "car", "striped rug"], [["person", "people"], ["car"], ["striped rug"]])
    f = tmp_path / "classes.txt"
    f.write_text("# comment\nperson, people; man\n\ncar\nstriped rug; carpet, rug\n")
    want = [["person", "people", "man"], ["car"], ["striped rug", "carpet", "rug"]]
    assert read_class_file(f) == want
    assert eval_names.read_class_file is read_class_file and eval_names.parse_class_lines is parse_class_lines
    assert parse_class_text(f.read_text()) == want                   # multi-line text: one class per line
    assert parse_classes(want) == (["person", "car", "striped rug"], want)
    # a file line pasted as one --classes entry (',' -> ';') and a list item mean the same class
    assert parse_classes("person; people; man, car")[1][0] == parse_classes(["person; people; man"])[1][0] == want[0]
    assert parse_classes(["a small, brown dog"])[0] == ["a small, brown dog"]  # list item: one class per item
    assert parse_classes("dog; dog; puppy")[1] == [["dog", "puppy"]]          # repeated synonyms dropped


@pytest.mark.parametrize("bad,msg", [("", "empty"), ("  ,  ", "empty"), ("cat,,dog", "#2 is empty"),
                                     ("Cat, cat", "twice"), ([], "empty"), (["cat", 3], "strings")])
def test_grammar_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_classes(bad)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("cat\nCat, kitty\n")
    with pytest.raises(ValueError, match=r"c\.txt: class 'Cat' appears twice \(line 1 and line 2\)"):
        read_class_file(f)
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"c\.txt: not a UTF-8"):
        read_class_file(f)
    with pytest.raises(FileNotFoundError):
        read_class_file(tmp_path / "missing.txt")


def test_cli_help_states_the_grammar():
    from typer.testing import CliRunner

    from reme.cli import app

    runner = CliRunner()
    for cmd in ("segment", "eval", "build-reference", "ablate"):
        text = " ".join(runner.invoke(app, [cmd, "--help"], terminal_width=400, env={"COLUMNS": "400"}).output.split())
        assert "one class per comma in a string" in text and "synonym scores are merged by max" in text, cmd
    assert "';'" in CLASS_LIST_GRAMMAR


def test_segment_classes_file_and_paper_form_through_the_cli(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from reme.cli import app
    from reme.inference.segmenter import Segmenter

    img = tmp_path / "coffee.png"
    Image.fromarray(photo("coffee")[::3, ::3].copy()).save(img)
    f = tmp_path / "classes.txt"
    f.write_text("cup, mug\ntable; desk\n")
    res = CliRunner().invoke(app, ["segment", str(img), "--classes-file", str(f), "--paper-form",
                                   "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "o" / "coffee_scores.json").read_text())
    assert scores["classes"] == ["cup", "table"]                      # synonyms of the file, not "cup, mug"
    paper = Segmenter(REPO / "reference_sets" / "default", device="cpu", segment_logit_scale=1.0,
                      label_logit_scale=1.0, top_k=None).predict(str(img), "cup; mug, table; desk")
    got = np.array([scores["max_segment_score"][c] for c in ("cup", "table")])
    np.testing.assert_allclose(got, paper.segment_scores.max(0), atol=2e-6)
    default = Segmenter(REPO / "reference_sets" / "default", device="cpu").predict(str(img), "cup; mug, table; desk")
    assert not np.allclose(got, default.segment_scores.max(0), atol=1e-3)   # --paper-form changed the numbers
    # near-flat paper-form softmaxes: every name's score stays close to 1 / c' (c' = 4 names)
    assert np.all(np.abs(got - 0.25) < 0.03)
