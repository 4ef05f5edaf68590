"""Overfitting/forgetting guards, early stop and keep-best on crafted metric sequences."""

from __future__ import annotations

import json

from dsclip.config import EvalConfig
from dsclip.guards import Guards, parse_keep_best


def _guards(**kw) -> Guards:
    cfg = EvalConfig()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return Guards(cfg)


def _run(g: Guards, seq: list[tuple[int, float, dict]]):
    return [g.update(step, train, metrics) for step, train, metrics in seq]


def test_overfit_fires_after_k_rises_while_train_falls():
    g = _guards(overfit_patience=3, early_stop="overfit")
    seq = [
        (0, float("nan"), {"val/loss": 2.0}),
        (10, 1.9, {"val/loss": 1.5}),
        (20, 1.5, {"val/loss": 1.6}),
        (30, 1.2, {"val/loss": 1.7}),
        (40, 1.0, {"val/loss": 1.8}),
    ]
    d = _run(g, seq)
    assert [x.stop for x in d] == [False, False, False, False, True]
    assert any("overfitting" in w and "1.5000 -> 1.8000" in w for w in d[-1].warnings)
    assert not any(x.warnings for x in d[:-1])


def test_overfit_needs_consecutive_rises_and_falling_train_loss():
    # a dip inside the window breaks the run of rises
    d = _run(
        _guards(overfit_patience=2),
        [
            (1, 2.0, {"val/loss": 1.0}),
            (2, 1.8, {"val/loss": 1.2}),
            (3, 1.6, {"val/loss": 1.1}),
            (4, 1.4, {"val/loss": 1.3}),
        ],
    )
    assert not any(x.warnings for x in d)
    # val loss rising while the train loss rises too is not overfitting
    d = _run(
        _guards(overfit_patience=2),
        [(1, 1.0, {"val/loss": 1.0}), (2, 1.1, {"val/loss": 1.2}), (3, 1.2, {"val/loss": 1.4})],
    )
    assert not any(x.warnings for x in d)
    # patience 0 turns it off; evals without val/loss are ignored
    d = _run(_guards(overfit_patience=0), [(i, 1.0 / (i + 1), {"val/loss": float(i)}) for i in range(5)])
    assert not any(x.warnings for x in d)
    g = _guards(overfit_patience=1)
    d = _run(
        g, [(1, 2.0, {"val/loss": 1.0}), (2, 1.5, {"zeroshot/a/top1": 0.5}), (3, 1.0, {"val/loss": 1.1})]
    )
    assert "overfitting" in d[-1].warnings[0] and not d[-1].stop  # early_stop off: warn only


def test_forgetting_against_baseline():
    g = _guards(forget_threshold=5.0, early_stop="forget")
    d = _run(
        g,
        [
            (0, float("nan"), {"zeroshot/imagenet/top1": 0.60, "zeroshot/pets/top1": 0.80}),
            (10, 1.0, {"zeroshot/imagenet/top1": 0.56, "zeroshot/pets/top1": 0.81}),  # -4 points: fine
            (20, 0.9, {"zeroshot/imagenet/top1": 0.549, "zeroshot/pets/top1": 0.80}),
        ],
    )  # -5.1 points
    assert [x.stop for x in d] == [False, False, True]
    assert d[1].warnings == []
    msg = [w for w in d[2].warnings if w.startswith("forgetting")]
    assert len(msg) == 1 and "imagenet" in msg[0] and "5.10 points" in msg[0]
    # the mean over datasets is not a dataset
    g = _guards(forget_threshold=1.0)
    d = _run(g, [(0, 1.0, {"zeroshot/mean_top1": 0.9}), (1, 1.0, {"zeroshot/mean_top1": 0.1})])
    assert not any(x.warnings for x in d)


def test_early_stop_any_and_off():
    seq = [(0, float("nan"), {"zeroshot/a/top1": 0.5}), (1, 1.0, {"zeroshot/a/top1": 0.3})]
    assert _run(_guards(early_stop="any"), seq)[-1].stop
    assert not _run(_guards(early_stop="overfit"), seq)[-1].stop
    last = _run(_guards(early_stop="off"), seq)[-1]
    assert not last.stop and last.warnings


def test_keep_best_direction_and_baseline():
    assert parse_keep_best("val/loss") == ("val/loss", True)
    assert parse_keep_best("val/image_to_text_mean_rank") == ("val/image_to_text_mean_rank", True)
    assert parse_keep_best("zeroshot/imagenet/top1") == ("zeroshot/imagenet/top1", False)
    assert parse_keep_best("-val/image_to_text_R@1") == ("val/image_to_text_R@1", True)
    assert parse_keep_best("+val/loss") == ("val/loss", False)
    assert parse_keep_best(None) is None

    g = _guards(keep_best="val/loss")
    d = _run(
        g,
        [
            (0, 1.0, {"val/loss": 2.0}),
            (10, 1.0, {"val/loss": 2.5}),
            (20, 1.0, {"val/loss": 1.9}),
            (30, 1.0, {"val/loss": 1.95}),
            (40, 1.0, {"zeroshot/x/top1": 0.2}),
            (50, 1.0, {"val/loss": 1.5}),
        ],
    )
    # baseline sets the bar but is never "best"; evals lacking the metric are not best
    assert [x.is_best for x in d] == [False, False, True, False, False, True]
    assert g.best == 1.5 and g.best_step == 50

    g = _guards(keep_best="imagenet/top1")  # suffix of a unique metric name
    d = _run(
        g,
        [
            (5, 1.0, {"zeroshot/imagenet/top1": 0.3}),
            (6, 1.0, {"zeroshot/imagenet/top1": 0.4}),
            (7, 1.0, {"zeroshot/imagenet/top1": 0.4}),
        ],
    )
    assert [x.is_best for x in d] == [True, True, False]


def test_keep_best_unknown_metric_warns_once():
    g = _guards(keep_best="val/acc")
    d = _run(g, [(1, 1.0, {"val/loss": 1.0}), (2, 1.0, {"val/loss": 0.5})])
    assert "--keep-best 'val/acc'" in d[0].warnings[0] and d[1].warnings == []
    assert not any(x.is_best for x in d)


def test_state_dict_round_trip():
    g = _guards(overfit_patience=2, keep_best="val/loss", forget_threshold=1.0)
    _run(g, [(0, float("nan"), {"val/loss": 2.0, "zeroshot/a/top1": 0.5}), (1, 1.0, {"val/loss": 1.0})])
    state = json.loads(json.dumps(g.state_dict()))  # must be plain data
    h = _guards(overfit_patience=2, keep_best="val/loss", forget_threshold=1.0)
    h.load_state_dict(state)
    seq = [(2, 0.9, {"val/loss": 1.1, "zeroshot/a/top1": 0.45}), (3, 0.8, {"val/loss": 1.2})]
    a, b = _run(g, seq), _run(h, seq)
    assert [(x.warnings, x.stop, x.is_best) for x in a] == [(x.warnings, x.stop, x.is_best) for x in b]
    assert any("overfitting" in w for w in b[-1].warnings) and any("forgetting" in w for w in b[0].warnings)
