"""Drive keep-alive HTTP load with wrk and read its figures back: requests/s, latency percentiles, errors.

Every benchmark that needs closed-loop HTTP load (sidecar, gateways, publisher)
goes through here, so they pin, run and parse wrk the same way.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from testbed.cpus import pinned

__all__ = ["WrkError", "WrkResult", "header_pool_script", "parse_wrk", "pool_statuses", "run_wrk", "wrk_binary"]

_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_PERCENTILE_RE = re.compile(rf"^\s+([\d.]+)%\s+{_TIME}\s*$", re.M)
_TOTAL_RE = re.compile(rf"^\s+(\d+) requests in {_TIME}", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_MEAN_RE = re.compile(rf"^\s+Latency\s+{_TIME}\s", re.M)  # the thread stats' Avg column
_NON_2XX_RE = re.compile(r"^\s+Non-2xx or 3xx responses: (\d+)", re.M)
_SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

# A request per pool entry is formatted once in init(), so request() costs wrk one table index.
_POOL_SCRIPT: Final = """\
local values_file = %(path)s
local header = %(header)s
local prefix = %(prefix)s
local requests = {}
local count = 0
local i = 0

init = function(args)
  for line in io.lines(values_file) do
    count = count + 1
    requests[count] = wrk.format(nil, nil, {[header] = prefix .. line})
  end
  assert(count > 0, "no values in " .. values_file)
end

request = function()
  i = i %% count + 1
  return requests[i]
end

-- With a mean think time, each connection waits an exponential delay before its next request,
-- so the connections together offer a steady rate instead of saturating the server.
local mean_delay_ms = %(delay)s
if mean_delay_ms > 0 then
  delay = function()
    return math.floor(-mean_delay_ms * math.log(1 - math.random()) + 0.5)
  end
end
"""


class WrkError(RuntimeError):
    """wrk could not run, or printed something this module cannot read."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: totals, latency percentiles in seconds, and what went wrong."""

    requests: int
    seconds: float
    requests_per_second: float
    percentiles: dict[float, float]
    mean: float  # latency, seconds
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    output: str

    @property
    def p50(self) -> float:
        """Median latency in seconds."""
        return self.percentiles[50.0]

    @property
    def p99(self) -> float:
        """99th percentile latency in seconds."""
        return self.percentiles[99.0]

    @property
    def errors(self) -> int:
        """Responses with status ≥ 400 plus socket errors of any kind."""
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def wrk_binary() -> str:
    """Path of the wrk executable (Debian: `apt-get install -y wrk`)."""
    found = shutil.which("wrk")
    if found is None:
        raise WrkError("wrk not found: install it (Debian: apt-get install -y wrk)")
    return found


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Read the summary wrk prints with `--latency`."""
    total = _TOTAL_RE.search(output)
    rps = _RPS_RE.search(output)
    mean = _MEAN_RE.search(output)
    percentiles = {float(p): _seconds(v, u) for p, v, u in _PERCENTILE_RE.findall(output)}
    if total is None or rps is None or mean is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise WrkError(f"cannot read wrk's output (was --latency given?):\n{output}")
    non_2xx = _NON_2XX_RE.search(output)
    socket = _SOCKET_RE.search(output)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if socket is not None:
        socket_errors = dict(zip(socket_errors, map(int, socket.groups()), strict=True))
    return WrkResult(
        requests=int(total.group(1)),
        seconds=_seconds(total.group(2), total.group(3)),
        requests_per_second=float(rps.group(1)),
        percentiles=percentiles,
        mean=_seconds(mean.group(1), mean.group(2)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        output=output,
    )


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def header_pool_script(
    directory: Path, header: str, values: Iterable[str], *, prefix: str = "", mean_delay_ms: float = 0.0
) -> Path:
    """Write a wrk script sending `header: <prefix><value>` cycling through `values`, optionally paced."""
    directory.mkdir(parents=True, exist_ok=True)
    values_file = directory / "header-values.txt"
    with values_file.open("w") as out:
        for value in values:
            if "\n" in value or "\r" in value:
                raise ValueError("header values cannot contain line breaks")
            out.write(value + "\n")
    script = directory / "header-pool.lua"
    script.write_text(
        _POOL_SCRIPT
        % {
            "path": _lua_string(str(values_file)),
            "header": _lua_string(header),
            "prefix": _lua_string(prefix),
            "delay": repr(float(mean_delay_ms)),
        }
    )
    return script


def pool_statuses(port: int, keys: Iterable[str], *, path: str = "/auth") -> dict[int, int]:
    """How many of `keys` each status answers on one keep-alive connection: a pool checked before wrk sends it."""
    seen: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for key in keys:
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            seen[resp.status] = seen.get(resp.status, 0) + 1
    finally:
        conn.close()
    return seen


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    script: Path | None = None,
    cpus: str | None = None,
    timeout: float = 5.0,
) -> WrkResult:
    """Run wrk once (bounded: it stops after `duration`, and is killed if it overruns) and parse it."""
    if threads < 1 or connections < threads:
        raise ValueError("need at least one thread and at least one connection per thread")
    command = [
        wrk_binary(),
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout))}s",
        "--latency",
    ]
    if script is not None:
        command.append(f"--script={script}")
    command.append(url)
    try:
        done = subprocess.run(
            pinned(command, cpus), capture_output=True, text=True, timeout=duration + timeout + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {duration + timeout + 30:.0f}s") from None
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)
