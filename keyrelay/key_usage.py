"""`keyrelay keys usage ID`: a key's verifications per hour or day, as its sidecars counted them
(`GET /v1/keys/{id}/usage`): a table of the buckets that saw any, the totals and the last use; with `--chart`,
one sparkline per outcome that fits 80 columns."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from keyrelay.core.config import parse_duration

from .answers import client_of, show
from .chart import chart_rows
from .output import escape, table

__all__ = ["OUTCOMES", "add_usage_options", "keys_usage", "usage_text"]

OUTCOMES: Final = ("valid", "revoked", "expired", "insufficient_scope")
_CHART_WIDTH: Final = 60  # with the longest label (insufficient_scope) and its gap: 80 columns


def _instant(text: str | None, flag: str) -> str | None:
    """An RFC 3339 time as given, or a duration (`7d`) as that long before now."""
    if text is None:
        return None
    try:
        ago = parse_duration(text)
    except ValueError:
        return text  # the publisher checks it, and names the parameter when it is not a time
    moment = datetime.fromtimestamp(time.time() - ago, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def add_usage_options(parser: argparse.ArgumentParser) -> None:
    """The options of `keys usage`."""
    parser.add_argument("key_id", help="key id")
    when = "an RFC 3339 time (2030-01-31T00:00:00Z) or how long ago (7d, 12h)"
    parser.add_argument("--from", dest="start", metavar="TIME", help=f"from when: {when}; default 24h before --to")
    parser.add_argument("--to", dest="end", metavar="TIME", help=f"until when: {when}; default now")
    parser.add_argument(
        "--granularity",
        choices=("hour", "day"),
        help="hour buckets (kept 30 days) or day buckets (kept a year); default: hour within the last 30 days",
    )
    parser.add_argument("--region", help="only what this region's sidecars saw (global: sidecars without a region)")
    parser.add_argument("--chart", action="store_true", help="also draw each outcome as a line of blocks (80 columns)")


def _label(at: str, granularity: str) -> str:
    # 2026-12-04T11:00:00.000Z → 2026-12-04 11:00 (hour) or 2026-12-04 (day)
    return at[:10] if granularity == "day" else f"{at[:10]} {at[11:16]}"


def _chart(usage: dict[str, Any]) -> list[str]:
    granularity, series = usage["granularity"], usage["series"]
    rows = [(outcome, [point[outcome] for point in series]) for outcome in OUTCOMES]
    lines, top = chart_rows(rows, width=_CHART_WIDTH)
    per = f"{len(series) / _CHART_WIDTH:.1f} {granularity}s" if len(series) > _CHART_WIDTH else f"one {granularity}"
    first, last = _label(series[0]["at"], granularity), _label(series[-1]["at"], granularity)
    indent = " " * (len(OUTCOMES[-1]) + 2)
    # The first bucket under the first column, the last under the last (past it when the chart is narrower).
    axis = f"{indent}{first}" + last.rjust(max(min(len(series), _CHART_WIDTH) - len(first), len(last) + 1))
    noun = "verification" if top == 1 else "verifications"
    return [f"each column: {per}; a full block: {top:,} {noun}", *lines, axis.rstrip()]


def usage_text(usage: dict[str, Any], *, chart: bool = False) -> str:
    """A usage answer as text: the buckets that saw any verification, the totals, the last use, and the chart."""
    granularity = usage["granularity"]
    where = f"region {usage['region']}" if usage["region"] else "every region"
    head = (
        f"{granularity} buckets from {_label(usage['from'], granularity)} to {_label(usage['to'], 'hour')} UTC, {where}"
    )
    used = [p for p in usage["series"] if any(p[o] for o in OUTCOMES)]
    rows = [{**p, "at": _label(p["at"], granularity)} for p in used]
    rows.append({"at": "total", **usage["totals"]})
    columns = [("at", "at"), *[(o.replace("_", " "), o) for o in OUTCOMES]]
    lines = [head, table(rows, columns)]
    quiet = len(usage["series"]) - len(used)
    if quiet:
        lines.append(f"({quiet} of {len(usage['series'])} buckets saw no verification)")
    if len(usage["regions"]) > 1:
        per_region = ", ".join(f"{escape(r)} {sum(c.values()):,}" for r, c in usage["regions"].items())
        lines.append(f"by region: {per_region}")
    if usage["last_used_at"]:
        lines.append(
            f"last used {usage['last_used_at']} in {escape(usage['last_used_region'] or '-')} "
            f"(sidecar {escape(usage['last_used_sidecar'] or '-')})"
        )
    else:
        lines.append("never used (as far as the sidecars have reported)")
    if chart:
        lines += ["", *_chart(usage)]
    return "\n".join(lines)


def keys_usage(args: argparse.Namespace) -> int:
    """Print a key's usage: a table (and a chart with --chart), or the API's JSON."""
    query = {
        "from": _instant(args.start, "--from"),
        "to": _instant(args.end, "--to"),
        "granularity": args.granularity,
        "region": args.region,
    }
    usage = client_of(args).call("GET", f"/keys/{quote(args.key_id, safe='')}/usage", **query)
    return show(args, usage, usage_text(usage, chart=args.chart))
