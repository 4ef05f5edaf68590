"""The faults table: a partial run of the fault suite updates its own rows and keeps the others."""

from __future__ import annotations

from tests.faults.conftest import merge_rows, read_table, write_table


def _row(fault: str, outcome: str, lost: int = 0) -> dict:
    return {"fault": fault, "injected": "x", "outcome": outcome, "steps_lost": lost, "samples_lost": 0,
            "checkpoints_lost": 0}


def test_partial_run_merges_rows_by_fault(tmp_path):
    path = str(tmp_path / "faults.md")
    write_table(path, [_row("a", "old a"), _row("b | with a pipe", "old b"), _row("c", "old c")])
    write_table(path, merge_rows(read_table(path), [_row("b | with a pipe", "new b", 2), _row("d", "new d")]))
    rows = read_table(path)
    assert [r["fault"] for r in rows] == ["a", "b | with a pipe", "c", "d"]
    assert [r["outcome"] for r in rows] == ["old a", "new b", "old c", "new d"]
    assert rows[1]["steps_lost"] == "2"
    assert merge_rows([], [_row("a", "1")]) == [_row("a", "1")]
