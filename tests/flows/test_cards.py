"""The flow's card contents, without running the flow: the distill card's collapse diagnostics."""

from __future__ import annotations

from flows.cards import collapse_rows
from pcsd_core.metric_names import COLLAPSE_METRICS


def test_collapse_rows_give_each_logged_diagnostic_at_the_first_and_last_step():
    history = [{name: 0.5 + index + 0.25 * step for index, name in enumerate(COLLAPSE_METRICS)} for step in range(3)]
    history[0].pop(COLLAPSE_METRICS[0])  # first logged at step 2: its first value is step 2's
    for row in history:
        row.pop(COLLAPSE_METRICS[-1])  # never logged: no row
    rows = collapse_rows(history)
    assert [row[0] for row in rows] == list(COLLAPSE_METRICS[:-1])
    assert rows[0] == [COLLAPSE_METRICS[0], "0.75", "1"]
    for index, row in enumerate(rows[1:], start=1):
        assert row == [COLLAPSE_METRICS[index], f"{0.5 + index:.4g}", f"{0.5 + index + 0.5:.4g}"]
    assert collapse_rows([]) == []
