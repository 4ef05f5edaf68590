"""``dsclip demo --quick``: the whole story runs end to end on 2 CPU ranks and fine-tuning helps."""

import csv
import json
import os

import pytest

from dsclip import demo


def test_generated_domains_differ_but_keep_the_classes():
    import random

    a = demo.draw("red", "circle", "A", random.Random(0))
    b = demo.draw("red", "circle", "B", random.Random(0))
    assert a.size == b.size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    # the negative of a red circle on a light background: a cyan circle on a dark one
    assert sum(a.getpixel((0, 0))) > 500 and sum(b.getpixel((0, 0))) < 250
    assert len(demo.classes()) == len(demo.COLOURS) * len(demo.SHAPES)
    assert demo.caption("red", "circle", "B") == "a negative of a red circle"


@pytest.mark.dist
def test_quick_demo_fine_tuning_raises_domain_b(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--nproc", "2"]) == 0
    printed = capsys.readouterr().out
    assert "WiSE-FT" in printed and "where things are" in printed
    assert "2 rank(s) on cpu (gloo), ZeRO-2" in printed  # the fine-tune runs under ZeRO-2 on 2 CPU ranks
    # fine-tuning on B at a high lr forgets A: the trainer's forgetting guard must say so
    assert "WARNING: forgetting: zero-shot top-1 on A" in printed

    before, after = demo.zeroshot_before_after(str(out / "runs" / "finetune"))
    assert after["B"] > before["B"] + 0.10, (before, after)

    for name in ("base", "finetune"):
        assert os.path.getsize(out / "runs" / name / "final.safetensors") > 0
    assert any((out / "runs" / "finetune" / "tensorboard").iterdir())
    wise = out / "wiseft"
    with open(wise / "wiseft.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert os.path.getsize(wise / "wiseft.png") > 0
    best = json.loads((wise / "wiseft_best.json").read_text())
    assert os.path.isfile(best["weights"])

    # a second run into the same folder refuses instead of mixing runs
    assert demo.main(["--quick", "--out", str(out)]) == 2
