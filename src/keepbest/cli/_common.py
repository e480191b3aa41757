"""What every command shares: finding what a path holds, picking a series, exit codes."""

from __future__ import annotations

import sys

from keepbest.discovery import Found, find
from keepbest.errors import StorageError

OK, PROBLEM, USAGE = 0, 1, 2
"""Exit codes: 0 success, 1 a problem was found (a damaged checkpoint, a failed check), 2 bad input (a path
that does not exist, a URL that cannot be served, a wrong argument)."""


class UsageError(Exception):
    """Bad input found while a command runs: ``keepbest`` prints the message and exits with :data:`USAGE`."""


def find_or_report(path: str) -> Found | None:
    """What ``path`` holds; None (with a message) when it does not exist or cannot be served."""
    try:
        found = find(path)
    except (StorageError, ValueError) as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return None
    if found.name is None and not found.store.exists():
        print(f"keepbest: {path} does not exist. Pass a folder of checkpoints, a checkpoint folder or a "
              f"Keras file. Received: {path}", file=sys.stderr)
        return None
    return found


def series_of(found: Found, wanted: str | None) -> str:
    """The series to act on: the one asked for, or the folder's only one."""
    names = sorted({c.manifest.series for c in found.checkpoints})
    if wanted is not None and wanted in names:
        return wanted
    if wanted is None and len(names) == 1:
        return names[0]
    what = f"has no series '{wanted}'" if wanted else f"holds {len(names)} series, so --series must pick one"
    raise UsageError(f"keepbest: {found.store.where()} {what}. Available: {', '.join(names) or 'none'}. "
                     f"Received: --series {wanted}")
