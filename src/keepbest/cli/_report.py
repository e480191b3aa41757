"""``keepbest report``: one offline HTML page with the plots of a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from keepbest.cli._common import PROBLEM, USAGE, find_or_report
from keepbest.errors import StorageError
from keepbest.report import write_report


def _report(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return USAGE
    try:
        where, data = write_report(found.store, args.output, series=args.series, verify=args.verify)
    except ValueError as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return USAGE
    except (StorageError, OSError) as e:
        print(f"keepbest: Cannot write the report to {args.output}: {e}. Pass -o with a writable local path. "
              f"Received: -o {args.output}", file=sys.stderr)
        return USAGE
    saves = sum(len(s.saves) for s in data.series)
    problems = data.damaged or any(s.state == "damaged" or s.integrity.startswith("corrupt")
                                   for r in data.series for s in r.saves)
    if args.json:
        doc = {"output": where, **dataclasses.asdict(data)}
        print(json.dumps(_finite(doc), indent=1, default=str))
    else:
        print(f"Wrote {where} ({len(data.series)} series, {saves} save(s))")
    return PROBLEM if problems else 0


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as text ("nan", "inf"), which JSON has no numbers for."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="write one self-contained HTML page with the plots of a run")
    report.add_argument("dir", help="a folder holding checkpoints, or a bucket URL (s3://bucket/prefix)")
    report.add_argument("-o", "--output", default="report.html",
                        help="the HTML file to write (a local path; default: report.html)")
    report.add_argument("--series", help="report only this series (default: every series)")
    report.add_argument("--verify", action="store_true",
                        help="re-hash every kept checkpoint for the integrity column (reads all the data)")
    report.add_argument("--json", action="store_true", help="also print what the page shows, as JSON")
    report.set_defaults(func=_report)
