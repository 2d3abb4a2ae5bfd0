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


@pytest.mark.parametrize("bad,msg", [("", "empty"), ("  ,  ", "empty"), ("cat\x00", "control"),
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
                      label_logit_scale=1.0, top_k=None, unlabelled=False).predict(str(img), "cup; mug, table; desk")
    got = np.array([scores["max_segment_score"][c] for c in ("cup", "table")])
    np.testing.assert_allclose(got, paper.segment_scores.max(0), atol=2e-6)
    default = Segmenter(REPO / "reference_sets" / "default", device="cpu").predict(str(img), "cup; mug, table; desk")
    assert not np.allclose(got, default.segment_scores.max(0), atol=1e-3)   # --paper-form changed the numbers
    # near-flat paper-form softmaxes: every name's score stays close to 1 / c' (c' = 4 names)
    assert np.all(np.abs(got - 0.25) < 0.03)


# --- issue 22: one grammar for class files and labels ---------------------------------------------

def test_empty_entries_are_ignored_with_a_warning_everywhere():
    for text, want in (("sky, tree, building,", ["sky", "tree", "building"]), ("cat,,dog", ["cat", "dog"]),
                       ("sky; ;clouds, sea", ["sky", "sea"])):
        with pytest.warns(UserWarning, match="empty|ignored"):
            assert parse_classes(text)[0] == want
    with pytest.warns(UserWarning):
        assert parse_classes(["cat", "", "dog"])[0] == ["cat", "dog"]


@pytest.mark.parametrize("bad,msg", [("cat, dog", "','"), ("cat; dog", "';'"), ("cat\x00", "control"),
                                     ("x" * 10_000, "at most"), ("  ", "non-empty")])
def test_labels_follow_the_grammar(bad, msg):
    from reme.classes import check_label
    from reme.reference.overlay import normalise_label

    for fn in (check_label, normalise_label):
        with pytest.raises(ValueError, match=msg):
            fn(bad)
    assert check_label("  coffee   cup ") == "coffee cup"


def test_control_characters_and_long_names_refused_in_class_lists():
    with pytest.raises(ValueError, match="control"):
        parse_classes("cat\x07, dog")
    with pytest.raises(ValueError, match="at most"):
        parse_classes(["y" * 500])


def test_blank_line_in_a_mask_class_file_is_an_error_naming_it(tmp_path):
    """An 11-line file with a blank 7th line gave 10 classes, shifting values 7.. (issue 22)."""
    f = tmp_path / "classes.txt"
    names = [f"c{i}" for i in range(11)]
    names[6] = ""
    f.write_text("\n".join(names) + "\n\n")
    with pytest.raises(ValueError, match=r"classes\.txt: line 7 is blank"):
        read_class_file(f, indexed=True)
    assert len(read_class_file(f)) == 10                              # a plain class list: blank lines skipped
    f.write_text("# header\nvoid\ncat\n")
    with pytest.raises(ValueError, match="line 1 is a comment"):
        read_class_file(f, indexed=True)
    f.write_text("void\ncat\n\n# trailing notes are fine\n")
    assert read_class_file(f, indexed=True) == [["void"], ["cat"]]


def test_void_like_names():
    from reme.classes import looks_void

    assert all(looks_void(n) for n in ("void", "Unlabeled", "unlabelled", "ignore", "dont_care", "Don't care"))
    assert not any(looks_void(n) for n in ("background", "sky", "avoid", "void deck"))


def test_labels_equal_but_for_case_are_one_label():
    from test_overlay_transactions import add_one, tiny_base

    from reme.reference.overlay import Overlay

    ov = Overlay.empty(tiny_base())
    add_one(ov, "Cat", 1)
    add_one(ov, "cat", 2)
    assert ov.labels == ["Cat", "Cat"] and list(ov.label_embeddings) == ["Cat"]
    assert ov.new_labels(["a", "CAT"]) == [] and ov.label_ids(["a", "CAT"]).tolist() == [1, 1]
