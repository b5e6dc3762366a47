"""Kernel-free interactive panels: controls ``jslink``-ed to ``Stack.selected_index`` over precomputed
images, so the page works as static HTML where no Python callback can run (docs/conventions.md#stack)."""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as w


def stack_explorer(
    panels: dict[tuple[object, object], bytes],
    rows: Sequence[object],
    cols: Sequence[object],
    *,
    row_label: str,
    col_label: str,
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
    panel_width: str = "460px",
) -> w.VBox:
    """Choose a row value with a slider and a column value with toggle buttons; show that PNG panel.

    One inner ``Stack`` per column holds a panel per row, all linked to the slider; an outer ``Stack``
    over the columns is linked to the buttons. Only ``jslink``: the widget state saved in the notebook
    is enough for the HTML page.

    Args:
        panels: PNG bytes keyed by ``(row, col)``; a missing key shows a short text instead.
        rows, cols: the values along each control, in order.
        panel_width: the largest width a panel is shown at (CSS, e.g. ``"100%"`` for wide panels).
    """
    row_names = [str(r) for r in rows] if row_names is None else list(row_names)
    col_names = [str(c) for c in cols] if col_names is None else list(col_names)
    slider = w.IntSlider(
        value=0,
        min=0,
        max=len(rows) - 1,
        description=row_label,
        readout=False,
        continuous_update=True,
        layout=w.Layout(width="340px"),
    )
    readout = w.Stack([w.HTML(f"<b>{row_label} = {name}</b>") for name in row_names], selected_index=0)
    w.jslink((slider, "value"), (readout, "selected_index"))
    buttons = w.ToggleButtons(options=col_names, index=0, description=col_label)
    inner = []
    for c in cols:
        children = [
            w.Image(value=panels[(r, c)], format="png", layout=w.Layout(max_width=panel_width))
            if (r, c) in panels
            else w.HTML("<i>no result for this configuration</i>")
            for r in rows
        ]
        stack = w.Stack(children, selected_index=0)
        w.jslink((slider, "value"), (stack, "selected_index"))
        inner.append(stack)
    outer = w.Stack(inner, selected_index=0)
    w.jslink((buttons, "index"), (outer, "selected_index"))
    return w.VBox([w.HBox([slider, readout]), buttons, outer])
