"""Zero-shot datasets: spec parsing, layouts, class-name/template files, and rank/worker sharding."""

from __future__ import annotations

import collections

import open_clip.zero_shot_metadata as ocm
import pytest

from dsclip.config import ConfigError
from dsclip.imagenet_meta import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from dsclip.zeroshot_data import fill_template, load_zeroshot_datasets, parse_zeroshot_specs
from tests.test_eval_helpers import CLASSES, make_image_folder, make_shards


def _identity(im):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(im)


def test_imagenet_meta_matches_the_published_lists():
    assert IMAGENET_CLASSNAMES == tuple(ocm.IMAGENET_CLASSNAMES)
    assert [t.format("X") for t in OPENAI_IMAGENET_TEMPLATES] == [
        t("X") for t in ocm.OPENAI_IMAGENET_TEMPLATES
    ]


def test_spec_parsing():
    specs = parse_zeroshot_specs(
        "a=/d/x, b-2=/s/shard-{000..003}.tar::classnames=/c.txt::templates=/t.txt,c.v=s3://bucket/{a,b}.tar"
    )
    assert [(s.name, s.path) for s in specs] == [
        ("a", "/d/x"),
        ("b-2", "/s/shard-{000..003}.tar"),
        ("c.v", "s3://bucket/{a,b}.tar"),
    ]
    assert specs[1].classnames_file == "/c.txt" and specs[1].templates_file == "/t.txt"
    assert parse_zeroshot_specs("") == []
    for bad, msg in (
        ("justapath", "name=path"),
        ("a=/x,a=/y", "unique"),
        ("a b=/x", "letters"),
        ("a=/x::colour=red", "classnames=FILE"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_zeroshot_specs(bad)
    assert fill_template("a {} of {c}", "cat") == "a cat of cat"


def test_image_folder_names_and_templates(tmp_path):
    root = make_image_folder(str(tmp_path / "f"), per_class=(2, 3), names=False, templates=False)
    (ds,) = load_zeroshot_datasets(f"f={root}", "", _identity, 32)
    assert ds.classnames == ["c0 red square", "c1 green disc"]  # folder names, '_' -> ' '
    assert len(ds.templates) == 80 and ds.num_samples == 5
    (tmp_path / "t.txt").write_text("itap of a {}.\n\n")
    (tmp_path / "n.txt").write_text("red\ngreen\n")
    (ds,) = load_zeroshot_datasets(
        f"f={root}::classnames={tmp_path}/n.txt::templates={tmp_path}/t.txt", "", _identity, 32
    )
    assert ds.classnames == ["red", "green"] and ds.templates == ["itap of a {}."]
    (tmp_path / "n3.txt").write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match="3 class names for 2 class folders"):
        load_zeroshot_datasets(f"f={root}::classnames={tmp_path}/n3.txt", "", _identity, 32)
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ConfigError, match="no '\\{\\}'"):
        load_zeroshot_datasets(f"f={root}::templates={tmp_path}/bad.txt", "", _identity, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        load_zeroshot_datasets(f"f={tmp_path}/missing", "", _identity, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_zeroshot_datasets(f"e={tmp_path}/empty", "", _identity, 32)


def test_shards_need_classnames(tmp_path):
    root = make_shards(str(tmp_path / "s"), sizes=(3,))
    (tmp_path / "s" / "classnames.txt").unlink()
    with pytest.raises(ConfigError, match="classnames.txt"):
        load_zeroshot_datasets(f"s={root}", "", _identity, 32)
    with pytest.raises(ConfigError, match="matches no shard"):
        load_zeroshot_datasets(f"s={tmp_path}/nothing-{{0..3}}.tar", "", _identity, 32)


def _labels(ds, rank, world, workers=0):
    return [int(y) for _, yb in ds.loader(rank, world, batch_size=3, workers=workers) for y in yb]


@pytest.mark.parametrize(
    "sizes,world,workers", [((7, 5, 4), 2, 0), ((9,), 2, 0), ((7, 5, 4), 3, 2), ((6, 5), 1, 2)]
)
def test_shard_split_covers_every_sample_once(tmp_path, sizes, world, workers):
    root = make_shards(str(tmp_path / "s"), sizes=sizes, n_classes=len(CLASSES))
    specs = f"s={root}/shard-{{000..{len(sizes) - 1:03d}}}.tar" if len(sizes) > 1 else f"s={root}"
    (ds,) = load_zeroshot_datasets(specs, "", _identity, 32)
    assert ds.templates == ["a photo of a {}.", "art of the {}."]  # templates.txt beside the shards
    per_rank = [_labels(ds, r, world, workers) for r in range(world)]
    everything = collections.Counter(y for part in per_rank for y in part)
    expected = collections.Counter(k % len(CLASSES) for k in range(sum(sizes)))
    assert everything == expected


def test_folder_split_covers_every_sample_once(tmp_path):
    root = make_image_folder(str(tmp_path / "f"))
    (ds,) = load_zeroshot_datasets(f"f={root}", "", _identity, 32)
    parts = [_labels(ds, r, 2) for r in range(2)]
    assert len(parts[0]) == 12 and len(parts[1]) == 11
    assert collections.Counter(parts[0] + parts[1]) == collections.Counter(y for _, y in ds.samples)
