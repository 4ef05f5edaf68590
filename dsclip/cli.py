"""``dsclip <subcommand>``: the command-line front.

Each subcommand is an importable ``main(argv)`` in its own module; this file only dispatches,
so ``import dsclip.cli`` stays cheap and ``dsclip --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("dsclip.train", "fine-tune a model (the deepspeed launcher and torchrun run dsclip/train.py)"),
    "export": ("dsclip.export", "consolidate a checkpoint into one open_clip-loadable file"),
    "shards": ("dsclip.data.shards", "build WebDataset shards + sizes.json from images and captions"),
    "eval": ("dsclip.eval_cli", "zero-shot and retrieval evaluation of any open_clip checkpoint"),
    "wiseft": ("dsclip.wiseft", "WiSE-FT weight ensembling sweep"),
    "demo": ("dsclip.demo", "the end-to-end fine-tuning demo on generated data"),
    "plan": ("dsclip.plan", "estimate per-rank memory and recommend a ZeRO stage and batch"),
}


def usage() -> str:
    lines = ["usage: dsclip <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`dsclip <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"dsclip: error: unknown command {cmd!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[cmd][0])
    except ModuleNotFoundError as e:
        if e.name == SUBCOMMANDS[cmd][0]:
            print(f"dsclip: error: `dsclip {cmd}` is not available in this build", file=sys.stderr)
            return 2
        raise
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
