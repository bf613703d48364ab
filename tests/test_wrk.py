"""Reading wrk's summary: what the benchmarks judge comes from here."""

from __future__ import annotations

import pytest

from loadtest.wrk import WrkError, parse_wrk

_OUTPUT = """Running 5s test @ http://127.0.0.1:38567/auth
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.54ms  541.49us  11.44ms   90.93%
    Req/Sec     5.08k   793.01     6.69k    64.00%
  Latency Distribution
     50%  1.43ms
     75%  1.70ms
     90%  2.00ms
     99%  3.10ms
  25277 requests in 5.00s, 8.36MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5054.49
Transfer/sec:      1.67MB
"""


def test_wrk_s_summary_gives_totals_percentiles_the_mean_and_errors() -> None:
    result = parse_wrk(_OUTPUT)
    assert (result.requests, result.seconds, result.requests_per_second) == (25277, 5.0, 5054.49)
    assert result.mean == pytest.approx(1.54e-3)
    assert result.p50 == pytest.approx(1.43e-3)
    assert result.p99 == pytest.approx(3.10e-3)
    assert result.errors == 4 + 2 + 1


def test_a_summary_without_the_latency_lines_is_refused() -> None:
    with pytest.raises(WrkError):
        parse_wrk(_OUTPUT.replace("    Latency     1.54ms  541.49us  11.44ms   90.93%\n", ""))
