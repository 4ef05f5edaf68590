"""Collects one row per fault test and writes the faults table at the end of the session.

A partial run (``pytest tests/faults -k ...``) updates only its own rows: the table already in
``benchmarks/results/faults.md`` is read back and rows are merged by their ``fault`` column,
new faults appended at the end."""

from __future__ import annotations

import os
import re

import pytest

from tests.launch import ROOT

COLUMNS = ["fault", "injected", "outcome", "steps_lost", "samples_lost", "checkpoints_lost"]
TABLE = os.path.join(ROOT, "benchmarks", "results", "faults.md")
_ROWS: list[dict] = []


@pytest.fixture
def fault_row():
    """Tests fill in: fault, injected, outcome, steps_lost, samples_lost, checkpoints_lost."""
    row: dict = {}
    yield row
    if row:
        _ROWS.append(row)


def _cell(value) -> str:
    return str(value).replace("\n", " ").replace("|", r"\|")


def read_table(path: str) -> list[dict]:
    """The rows of a faults table written by ``write_table`` (none if there is no file)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            if not line.startswith("| ") or line.startswith("|---"):
                continue
            cells = [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if cells == COLUMNS or len(cells) != len(COLUMNS):
                continue
            rows.append(dict(zip(COLUMNS, cells)))
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row replaced by the ``new`` row of the same fault; other new rows appended."""
    fresh = {str(r["fault"]): r for r in new}
    merged = [fresh.pop(str(r["fault"]), r) for r in old]
    return merged + list(fresh.values())


def write_table(path: str, rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("# Fault tests\n\nWritten by `pytest tests/faults` (2 gloo ranks on CPU, tiny model); a partial "
                 "run updates its own rows.\n\n" + table + "\n")
    return table


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    print("\n" + write_table(TABLE, merge_rows(read_table(TABLE), _ROWS)))
