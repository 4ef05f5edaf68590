"""Collects one row per fault test and writes the faults table at the end of the session."""

from __future__ import annotations

import os

import pytest

from tests.launch import ROOT

_ROWS: list[dict] = []


@pytest.fixture
def fault_row():
    """Tests fill in: fault, injected, outcome, steps_lost, samples_lost, checkpoints_lost."""
    row: dict = {}
    yield row
    if row:
        _ROWS.append(row)


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    cols = ["fault", "injected", "outcome", "steps_lost", "samples_lost", "checkpoints_lost"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in _ROWS]
    table = "\n".join(lines)
    print("\n" + table)
    out = os.path.join(ROOT, "benchmarks", "results", "faults.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write("# Fault tests\n\nWritten by `pytest tests/faults` (2 gloo ranks on CPU, tiny model).\n\n" + table + "\n")
