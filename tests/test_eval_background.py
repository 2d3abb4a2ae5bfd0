"""Background protocol of VOC-21, PC-60 and COCO-Object (issue 13): the field's stuff-word
background lines, "class + threshold" as the benchmarks' default, and the threshold mechanics."""

import numpy as np
import pytest

from reme.eval.datasets import BENCHMARKS
from reme.eval.names import CLASSNAMES_DIR, parse_class_lines
from reme.eval import protocol as P
from reme.eval.protocol import Protocol, benchmark_protocol, finalize_labels, make_plan

BG_BENCHMARKS = ("voc21", "pc60", "coco_object")
#: SCLIP / ProxyCLIP ``cls_voc21.txt`` background line (wangf3014/SCLIP, mc-lan/ProxyCLIP).
FIELD_STUFF = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, "
               "lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence").split(", ")


def _classes(name):
    return parse_class_lines((CLASSNAMES_DIR / f"{BENCHMARKS[name].classes}.txt").read_text().splitlines())


@pytest.mark.parametrize("name", ["voc21", "coco_object"])
def test_background_line_lists_the_fields_stuff_words(name):
    classes = _classes(name)
    bg = classes[BENCHMARKS[name].background_index]
    assert bg[0] == "background"                                   # display name unchanged
    others = {n.lower() for c in classes[1:] for n in c}
    # every stuff word of the field, except those that name another class of the benchmark
    assert bg[1:] == [w for w in FIELD_STUFF if w not in others]
    assert len(bg) >= 25 and not set(bg) & others


def test_coco_object_background_leaves_out_its_own_class_bed():
    bg = _classes("coco_object")[0]
    assert "bed" not in bg and "bed" in _classes("voc21")[0]


def test_pc60_background_is_the_single_word_as_in_the_field():
    # PC-60 names most stuff words as classes of its own (sky, wall, tree, grass, road, ...)
    classes = _classes("pc60")
    assert classes[0] == ["background"]
    names = {n for c in classes[1:] for n in c}
    assert {"sky", "wall", "tree", "grass", "road", "building", "floor"} <= names


@pytest.mark.parametrize("name", BG_BENCHMARKS)
def test_background_benchmarks_default_to_class_plus_threshold(name):
    p = benchmark_protocol(name)
    assert p.background == P.BENCHMARK_BACKGROUND_MODE == "class+threshold"
    assert p.bg_threshold == P.DEFAULT_BG_THRESHOLD
    plan = make_plan(_classes(name), BENCHMARKS[name].background_index, p)
    assert plan.queries[0].startswith("background") and plan.background_index == 0
    if name != "pc60":
        assert "sky" in plan.queries[0] and "wall" in plan.queries[0]    # queried through its stuff words


def test_old_mode_stays_an_option_with_its_own_threshold():
    p = benchmark_protocol("voc21", background="threshold")
    assert p.bg_threshold == P.THRESHOLD_MODE_BG_THRESHOLD
    plan = make_plan(_classes("voc21"), 0, p)
    assert not any(q.startswith("background") for q in plan.queries) and len(plan.queries) == 20
    assert benchmark_protocol("voc21", background="threshold", bg_threshold=0.3).bg_threshold == 0.3
    assert benchmark_protocol("ade150").background == "threshold"     # no background class: unused
    assert benchmark_protocol(None).background == "threshold"


def test_class_plus_threshold_mechanics_on_a_constructed_case():
    classes = [["background", "sky", "wall"], ["cat"], ["dog"]]
    plan = make_plan(classes, 0, Protocol(background="class+threshold", bg_threshold=0.5))
    assert plan.queries == ["background; sky; wall", "cat", "dog"]
    # query winners: bg, cat, dog, cat; confidences decide which become background
    label_q = np.array([[0, 1], [2, 1]])
    conf = np.array([[0.9, 0.49], [0.5, 0.8]], np.float32)
    pred = finalize_labels(label_q, conf, plan)
    assert pred.tolist() == [[0, 0], [2, 1]]                        # 0.49 < 0.5 -> background; 0.5 stays
    assert finalize_labels(label_q, conf, plan, bg_threshold=0.0).tolist() == [[0, 1], [2, 1]]
    assert (finalize_labels(label_q, conf, plan, bg_threshold=1.0) == 0).all()
    # each mode's default threshold: a confidence between the two defaults keeps its class with
    # the queried background and becomes background without it
    mid = np.float32((P.DEFAULT_BG_THRESHOLD + P.THRESHOLD_MODE_BG_THRESHOLD) / 2)
    assert P.DEFAULT_BG_THRESHOLD < mid < P.THRESHOLD_MODE_BG_THRESHOLD
    one = np.array([[1]]), np.array([[mid]])
    assert finalize_labels(*one, make_plan(classes, 0, Protocol(background="class+threshold"))).item() == 1
    thr = make_plan(classes, 0, Protocol(background="threshold"))
    assert thr.queries == ["cat", "dog"] and finalize_labels(np.array([[0]]), one[1], thr).item() == 0
    # pure class mode: the queried background wins only by argmax
    cls = make_plan(classes, 0, Protocol(background="class"))
    assert cls.background_index is None and finalize_labels(label_q, conf, cls).tolist() == [[0, 1], [2, 1]]
