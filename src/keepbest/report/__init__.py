"""``keepbest report``: one self-contained HTML page that shows a run at a glance.

The page shows, per series: the monitored metric per epoch (or step) with every save marked as kept,
deleted by retention (with the rule), best, or holding an alias; the training metrics beside the sidecar's
evaluation metrics; the bytes each save wrote and reused (dedup), its stall and persist time and its
integrity; the versions and aliases, and what W&B / MLflow publishers uploaded. It is read through the
storage contract, so a bucket URL works as a folder does, and deleted saves come from the series' history.

The page has no script and fetches nothing: inline CSS and SVG only (details on hover are SVG titles).
Its DOM ids, for tools and tests (the first series; the series after it add ``-1``, ``-2``, ...):

- ``metric-curve``: the monitored metric's curve (a ``polyline``, thinned to at most 1,200 points);
- ``best-marker``: the best save's star;
- ``kept-markers`` / ``deleted-markers``: one path holding every kept / deleted save's dot (never thinned);
- ``kept-v<N>`` / ``deleted-v<N>`` (classes ``kept-marker`` / ``deleted-marker``): one element per save,
  version ``N``, with its details as a tooltip (at most 250 of each kind, spread over the run);
- ``alias-v<N>`` (class ``alias-marker``): a save that ``latest`` or a user alias names;
  ``damaged-<name>`` (class ``damaged-marker``): a checkpoint that cannot be used;
- ``metric-<name>``, ``bytes``, ``timing``: the metric, bytes-per-save and stall/persist charts;
  ``saves``: the table of checkpoints.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager, KeepLast, Monitor
    >>> folder = tempfile.mkdtemp()
    >>> mgr = CheckpointManager(folder, monitor=Monitor("loss", "min"), keep=[KeepLast(1)])
    >>> for epoch in (1, 2, 3):
    ...     _ = mgr.save(epoch, {"w": np.zeros(4)}, metrics={"loss": 1 / epoch}, epoch=epoch)
    >>> data = gather(folder)
    >>> [(s.epoch, s.state) for s in data.series[0].saves]
    [(1, 'deleted'), (2, 'deleted'), (3, 'kept')]
    >>> 'id="metric-curve"' in render(data) and 'id="deleted-v0"' in render(data)
    True
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from keepbest import store as stores
from keepbest.report._data import ReportData, Save, SeriesReport, gather
from keepbest.report._html import render
from keepbest.report._svg import thin
from keepbest.store import Store

__all__ = ["ReportData", "Save", "SeriesReport", "gather", "render", "thin", "write_report"]


def write_report(location: str | os.PathLike[str] | Store, output: str | os.PathLike[str], *,
                 series: str | None = None, verify: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> tuple[str, ReportData]:
    """Writes the report of the checkpoints at ``location`` to the local file ``output``.

    Returns where it was written and what it shows. ``verify`` re-hashes every kept checkpoint (reads all
    the data) instead of trusting the listing.
    """
    data = gather(location, series=series, verify=verify, storage_options=storage_options)
    return stores.write_file(output, render(data).encode("utf-8")), data
