"""Labelled datasets for zero-shot classification.

Two layouts are read:
  * an image folder with one sub-folder per class (ImageNet's val layout); classes are the
    sorted sub-folder names, so WordNet-id folders line up with the standard class indices;
  * WebDataset shards whose samples carry an image and a ``cls`` entry (the class index as text).

Class names come from ``classnames.txt`` (one per line, in class-index order) and prompts from
``templates.txt`` (one per line, ``{}`` marks the class name), both looked up in the dataset
folder or given explicitly.  Without a templates file, OpenAI's 80 ImageNet templates are used.

``--zeroshot-data`` takes ``name=path[::classnames=FILE][::templates=FILE]``, several joined with
``,``.  Every rank reads a disjoint share of the samples (whole files or shards where there are
enough, every world-th sample otherwise), so counts summed over ranks cover each sample once.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .config import ConfigError
from .data.samples import open_rgb
from .imagenet_meta import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# a comma starts a new dataset only where ``name=`` follows; commas inside brace lists stay put
_SPLIT_RE = re.compile(r",(?=\s*[A-Za-z0-9_.-]+=)")


def read_lines(path: str, what: str) -> list[str]:
    """Non-blank lines of a small text file (local or remote), stripped."""
    from .data.s3 import read_small

    raw = read_small(path)
    if raw is None:
        raise ConfigError(f"{what} file not found: {path}; create it (one entry per line)")
    lines = [ln.strip() for ln in raw.decode("utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ConfigError(f"{what} file {path} is empty; put one entry per line")
    return lines


def read_templates(path: str) -> list[str]:
    templates = read_lines(path, "templates")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise ConfigError(f"template {bad[0]!r} in {path} has no '{{}}' where the class name goes; add it")
    return templates


def fill_template(template: str, classname: str) -> str:
    # str.replace rather than str.format: templates may contain other braces
    return template.replace("{c}", classname).replace("{}", classname)


class LabelledDataset:
    """Common interface: ``name``, ``classnames``, ``templates`` and ``loader(...)``."""

    name: str
    classnames: list[str]
    templates: list[str]
    image_size: tuple[int, int]
    max_pixels: int = 89_478_485  # images over this many pixels are refused from their header

    def loader(
        self, rank: int, world: int, batch_size: int, workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches of this rank's share."""
        raise NotImplementedError

    def dummy_batch(self) -> torch.Tensor:
        """One blank image, for ranks that have run out of data but must keep calling forward."""
        return torch.zeros(1, 3, *self.image_size)


DEFAULT_MAX_PIXELS = LabelledDataset.max_pixels  # PIL's own limit; the trainer passes --max-image-pixels


class _FileList(Dataset):
    def __init__(self, items: list[tuple[str, int]], preprocess: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.preprocess(open_rgb(path, path, self.max_pixels)), label


class ImageFolderDataset(LabelledDataset):
    def __init__(
        self,
        name: str,
        root: str,
        preprocess: Callable,
        image_size: tuple[int, int],
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        expect_classes: int | None = None,
    ):
        self.name, self.root, self.preprocess, self.image_size = name, root, preprocess, tuple(image_size)
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise ConfigError(
                f"zero-shot dataset '{name}': {root} has no class sub-folders; use one folder "
                f"per class (or WebDataset shards with a cls entry)"
            )
        if expect_classes is not None and len(folders) != expect_classes:
            raise ConfigError(
                f"zero-shot dataset '{name}': {root} has {len(folders)} class folders, expected "
                f"{expect_classes}; point it at the folder that holds one folder per class"
            )
        self.samples: list[tuple[str, int]] = []
        for label, folder in enumerate(folders):
            for dirpath, dirnames, files in os.walk(os.path.join(root, folder)):
                dirnames.sort()
                self.samples += [
                    (os.path.join(dirpath, f), label)
                    for f in sorted(files)
                    if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS
                ]
        if not self.samples:
            raise ConfigError(f"zero-shot dataset '{name}': no images ({', '.join(IMAGE_EXTS)}) under {root}")
        if classnames is None:
            path = os.path.join(root, CLASSNAMES_FILE)
            classnames = (
                read_lines(path, "classnames")
                if os.path.isfile(path)
                else [f.replace("_", " ") for f in folders]
            )
        if len(classnames) != len(folders):
            raise ConfigError(
                f"zero-shot dataset '{name}': {len(classnames)} class names for {len(folders)} "
                f"class folders in {root}; give one name per folder, in sorted folder order"
            )
        self.classnames = list(classnames)
        self.templates = list(templates or OPENAI_IMAGENET_TEMPLATES)
        self.num_samples = len(self.samples)

    def loader(self, rank: int, world: int, batch_size: int, workers: int = 0):
        share = _FileList(self.samples[rank::world], self.preprocess, self.max_pixels)
        return iter(DataLoader(share, batch_size=batch_size, num_workers=workers, shuffle=False))


def _split(n_items: int, index: int, count: int) -> tuple[slice, int | None]:
    """How reader ``index`` of ``count`` takes its share of ``n_items`` shards: whole shards
    (``items[index::count]``) when there are enough, else every sample (filtered by modulo)."""
    if count <= 1:
        return slice(None), None
    if n_items >= count:
        return slice(index, None, count), None
    return slice(None), index


class _ShardStream(IterableDataset):
    """This rank's samples of a set of WebDataset shards, split further over loader workers."""

    max_pixels = DEFAULT_MAX_PIXELS

    def __init__(self, urls: list[str], preprocess: Callable, rank: int, world: int, endpoint: str | None):
        self.urls, self.preprocess, self.rank, self.world, self.endpoint = (
            urls,
            preprocess,
            rank,
            world,
            endpoint,
        )

    def __iter__(self):
        shard_sel, sample_mod = _split(len(self.urls), self.rank, self.world)
        urls = self.urls[shard_sel]
        info = get_worker_info()
        w_id, w_num = (info.id, info.num_workers) if info else (0, 1)
        if sample_mod is None:
            shard_sel, worker_mod = _split(len(urls), w_id, w_num)
            urls = urls[shard_sel]
        else:
            worker_mod = w_id if w_num > 1 else None
        kept = 0
        for i, (key, sample) in enumerate(self._samples(urls)):
            if sample_mod is not None and i % self.world != sample_mod:
                continue
            kept += 1
            if worker_mod is not None and (kept - 1) % w_num != worker_mod:
                continue
            yield self._decode(key, sample)

    def _samples(self, urls: list[str]):
        from .data.s3 import open_shard

        for url in urls:
            with (
                open_shard(url, endpoint=self.endpoint) as stream,
                tarfile.open(fileobj=stream, mode="r|*") as tar,
            ):
                key, sample = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    k = os.path.join(os.path.dirname(member.name), stem)
                    if k != key and sample:
                        yield f"{url}:{key}", sample
                        sample = {}
                    key = k
                    sample[ext.lower()] = tar.extractfile(member).read()
                if sample:
                    yield f"{url}:{key}", sample

    def _decode(self, key: str, sample: dict[str, bytes]) -> tuple[torch.Tensor, int]:

        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(
                f"sample {key} lacks an image or a cls entry (has {sorted(sample)}); zero-shot "
                f"shards need both"
            )
        try:
            label = int(sample["cls"].decode().strip())
        except ValueError:
            raise ValueError(f"sample {key}: cls entry {sample['cls'][:20]!r} is not an integer") from None
        return self.preprocess(open_rgb(io.BytesIO(sample[ext]), key, self.max_pixels)), label


class ShardDataset(LabelledDataset):
    def __init__(
        self,
        name: str,
        urls: list[str],
        preprocess: Callable,
        image_size: tuple[int, int],
        classnames: list[str],
        templates: list[str] | None = None,
        endpoint: str | None = None,
    ):
        self.name, self.preprocess, self.image_size, self.endpoint = (
            name,
            preprocess,
            tuple(image_size),
            endpoint,
        )
        self.urls = list(urls)
        self.classnames = list(classnames)
        self.templates = list(templates or OPENAI_IMAGENET_TEMPLATES)
        self.num_samples = None

    def loader(self, rank: int, world: int, batch_size: int, workers: int = 0):
        stream = _ShardStream(self.urls, self.preprocess, rank, world, self.endpoint)
        stream.max_pixels = self.max_pixels
        return iter(DataLoader(stream, batch_size=batch_size, num_workers=workers))


@dataclass
class ZeroShotSpec:
    name: str
    path: str
    classnames_file: str | None = None
    templates_file: str | None = None


def parse_zeroshot_specs(spec: str) -> list[ZeroShotSpec]:
    """``name=path[::classnames=F][::templates=F]`` entries joined with ``,``."""
    out: list[ZeroShotSpec] = []
    for entry in (e.strip() for e in _SPLIT_RE.split(spec or "")):
        if not entry:
            continue
        name, sep, rest = entry.partition("=")
        name = name.strip()
        if not sep or not rest.strip():
            raise ConfigError(f"--zeroshot-data entry {entry!r} must be name=path, e.g. pets=/data/pets")
        if not _NAME_RE.match(name):
            raise ConfigError(f"--zeroshot-data name {name!r} may only use letters, digits, '_', '.', '-'")
        parts = rest.split("::")
        item = ZeroShotSpec(name, parts[0].strip())
        for opt in parts[1:]:
            key, _, value = opt.partition("=")
            if key.strip() not in ("classnames", "templates") or not value.strip():
                raise ConfigError(
                    f"--zeroshot-data option {opt!r} for '{name}' must be classnames=FILE or templates=FILE"
                )
            setattr(item, f"{key.strip()}_file", value.strip())
        out.append(item)
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--zeroshot-data names must be unique; {dup[0]!r} appears more than once")
    return out


def _is_shard_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:") or ".tar" in path or "{" in path or "*" in path


def open_zeroshot_dataset(
    spec: ZeroShotSpec,
    preprocess: Callable,
    image_size: tuple[int, int],
    allow_pipe: bool = False,
    endpoint: str | None = None,
) -> LabelledDataset:
    from .data.urls import join, parent_of

    path = spec.path
    classnames = read_lines(spec.classnames_file, "classnames") if spec.classnames_file else None
    templates = read_templates(spec.templates_file) if spec.templates_file else None
    local_dir = os.path.isdir(path)
    if local_dir and not any(f.endswith(".tar") for f in os.listdir(path)):
        if templates is None and os.path.isfile(os.path.join(path, TEMPLATES_FILE)):
            templates = read_templates(os.path.join(path, TEMPLATES_FILE))
        return ImageFolderDataset(spec.name, path, preprocess, image_size, classnames, templates)
    if not local_dir and not _is_shard_url(path):
        raise ConfigError(
            f"zero-shot dataset '{spec.name}': {path} does not exist; pass a class-folder "
            f"directory or WebDataset shards"
        )
    from .data.s3 import read_small
    from .data.urls import expand_url

    urls = expand_url(path, allow_pipe, endpoint)  # a missing shard is the first thing to report
    folder = path if local_dir else parent_of(path)

    if classnames is None:
        cn_path = join(folder, CLASSNAMES_FILE)
        if read_small(cn_path) is None:
            raise ConfigError(
                f"zero-shot dataset '{spec.name}': shards need class names; put {CLASSNAMES_FILE} "
                f"next to them or add ::classnames=FILE"
            )
        classnames = read_lines(cn_path, "classnames")
    if templates is None and read_small(join(folder, TEMPLATES_FILE)) is not None:
        templates = read_templates(join(folder, TEMPLATES_FILE))
    return ShardDataset(spec.name, urls, preprocess, image_size, classnames, templates, endpoint)


def imagenet_dataset(root: str, preprocess: Callable, image_size: tuple[int, int]) -> ImageFolderDataset:
    if not os.path.isdir(root):
        raise ConfigError(
            f"--imagenet-val {root} is not a directory; pass the val folder with 1000 class folders"
        )
    return ImageFolderDataset(
        "imagenet",
        root,
        preprocess,
        image_size,
        list(IMAGENET_CLASSNAMES),
        list(OPENAI_IMAGENET_TEMPLATES),
        expect_classes=len(IMAGENET_CLASSNAMES),
    )


def load_zeroshot_datasets(
    zeroshot_data: str,
    imagenet_val: str,
    preprocess: Callable,
    image_size: tuple[int, int] | int,
    allow_pipe: bool = False,
    endpoint: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[LabelledDataset]:
    """Every configured zero-shot dataset, checked now so a bad path fails at start-up."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    specs = parse_zeroshot_specs(zeroshot_data)
    if imagenet_val and any(s.name == "imagenet" for s in specs):
        raise ConfigError("--imagenet-val and a --zeroshot-data entry are both named 'imagenet'; rename one")
    out = [open_zeroshot_dataset(s, preprocess, size, allow_pipe, endpoint) for s in specs]
    if imagenet_val:
        out.append(imagenet_dataset(imagenet_val, preprocess, size))
    for ds in out:
        ds.max_pixels = max_pixels
    return out
