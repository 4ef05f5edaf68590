"""Shared pieces for the evaluation tests: generated labelled data, the tiny model, and
brute-force single-process references that the distributed code must reproduce."""

from __future__ import annotations

import io
import json
import os
import tarfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "assets", "tiny-clip.json")
CLASSES = [
    "red square",
    "green disc",
    "blue cross",
    "yellow stripe",
    "white ring",
    "cyan square",
    "orange disc",
]
_RGB = [
    (230, 30, 30),
    (30, 200, 30),
    (40, 60, 230),
    (240, 220, 20),
    (250, 250, 250),
    (20, 230, 230),
    (250, 140, 0),
]


def draw(label: int, index: int, size: int = 32):
    """A procedurally drawn image of class ``label`` (its shape and colour), jittered by ``index``."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(1000 * label + index)
    bg = tuple(int(v) for v in torch.randint(0, 90, (3,), generator=g))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    o = int(torch.randint(0, 6, (1,), generator=g))
    box = (4 + o, 4 + o, size - 6 + o // 2, size - 6 + o // 2)
    c = _RGB[label]
    [
        lambda: d.rectangle(box, fill=c),
        lambda: d.ellipse(box, fill=c),
        lambda: (
            d.line((0, size // 2, size, size // 2), fill=c, width=5),
            d.line((size // 2, 0, size // 2, size), fill=c, width=5),
        ),
        lambda: [d.line((0, y, size, y), fill=c, width=2) for y in range(0, size, 6)],
        lambda: d.ellipse(box, outline=c, width=4),
    ][label % 5]()
    return im


def make_image_folder(
    root: str, per_class: tuple[int, ...] = (5, 4, 6, 3, 5), names: bool = True, templates: bool = True
) -> str:
    """One sub-folder per class (``c0_red_square``...), uneven class sizes."""
    for label, n in enumerate(per_class):
        folder = os.path.join(root, f"c{label}_{CLASSES[label].replace(' ', '_')}")
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            draw(label, i).save(os.path.join(folder, f"img{i:03d}.png"))
    if names:
        with open(os.path.join(root, "classnames.txt"), "w") as fh:
            fh.write("\n".join(CLASSES[: len(per_class)]) + "\n")
    if templates:
        with open(os.path.join(root, "templates.txt"), "w") as fh:
            fh.write("a photo of a {}.\na drawing of the {}.\n")
    return root


def make_shards(root: str, sizes: tuple[int, ...] = (7, 5, 4), n_classes: int = 5) -> str:
    """WebDataset shards with ``png`` + ``cls`` entries, plus classnames.txt/templates.txt beside them."""
    os.makedirs(root, exist_ok=True)
    k = 0
    for s, n in enumerate(sizes):
        with tarfile.open(os.path.join(root, f"shard-{s:03d}.tar"), "w") as tar:
            for _ in range(n):
                label = k % n_classes
                buf = io.BytesIO()
                draw(label, k).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    with open(os.path.join(root, "classnames.txt"), "w") as fh:
        fh.write("\n".join(CLASSES[:n_classes]) + "\n")
    with open(os.path.join(root, "templates.txt"), "w") as fh:
        fh.write("a photo of a {}.\nart of the {}.\n")
    return root


def tiny_model(seed: int = 0, weights: str | None = None):
    """(model, preprocess_val, tokenizer) of the tiny test config, in eval-ready fp32."""
    import open_clip

    open_clip.add_model_config(TINY)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", output_dict=True)
    if weights:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model, preprocess, open_clip.get_tokenizer("tiny-clip")


class PairSource:
    """A validation source following the data protocol, with unique random captions (no ties)
    split evenly or unevenly over ranks."""

    def __init__(self, n: int, rank: int, world: int, batch_size: int, tokenizer, seed: int = 3):
        self.n, self.rank, self.world, self.batch_size, self.tokenizer = n, rank, world, batch_size, tokenizer
        self.seed = seed
        self.num_samples = n

    def sample(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        image = torch.randn(3, 32, 32, generator=g)
        words = ["cat", "dog", "red", "blue", "big", "small", "car", "tree", "sky", "sea", "one", "two"]
        caption = " ".join(words[int(j)] for j in torch.randint(len(words), (5,), generator=g)) + f" {i}"
        return image, caption

    def mine(self) -> list[int]:
        return list(range(self.rank, self.n, self.world))

    def batches(self, epoch: int = 0, start_batch: int = 0):
        idx = self.mine()
        for s in range(0, len(idx), self.batch_size):
            chunk = idx[s : s + self.batch_size]
            images, captions = zip(*(self.sample(i) for i in chunk))
            yield {
                "image": torch.stack(images),
                "text": self.tokenizer(list(captions)),
                "keys": [f"pair-{i}" for i in chunk],
            }

    def stats(self):
        return {}


def reference_retrieval(model, source_all: PairSource) -> dict[str, float]:
    """Brute force, one process, whole set in one batch, open_clip-style argsort ranks."""
    images, captions = zip(*(source_all.sample(i) for i in range(source_all.n)))
    with torch.no_grad():
        out = model(image=torch.stack(images), text=source_all.tokenizer(list(captions)))
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    res = {"loss": loss.item()}
    for name, lg in (("image_to_text", logits), ("text_to_image", logits.T)):
        ranking = torch.argsort(lg, descending=True)
        preds = torch.where(ranking == labels[:, None])[1].double()
        res[f"{name}_mean_rank"] = preds.mean().item() + 1
        res[f"{name}_median_rank"] = float(torch.floor(torch.quantile(preds, 0.5)).item() + 1)
        for k in (1, 5, 10):
            res[f"{name}_R@{k}"] = (preds < k).double().mean().item()
    return res


def reference_zeroshot(model, tokenizer, samples, classnames, templates) -> dict[str, float]:
    """samples: list of (image tensor, label).  Classifier built class by class, all images at once."""
    with torch.no_grad():
        rows = []
        for c in classnames:
            t = model(text=tokenizer([tp.replace("{}", c) for tp in templates]))["text_features"]
            rows.append(F.normalize(F.normalize(t, dim=-1).mean(0), dim=0))
        w = torch.stack(rows)
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples])
        feats = model(image=images)["image_features"]
        logits = 100 * feats @ w.T
        k = min(5, len(classnames))
        top = logits.topk(k, dim=1).indices
        return {
            "top1": (top[:, 0] == labels).double().mean().item(),
            "top5": (top == labels[:, None]).any(1).double().mean().item(),
            "num_samples": float(len(labels)),
        }


def read_json(path) -> object:
    with open(path) as fh:
        return json.load(fh)


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]
