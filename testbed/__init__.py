"""Test infrastructure the suite (tests/) and the benchmarks (loadtest/) share: real gateways, link proxies,
an echo upstream, the multi-region topology on loopback, and whole snapshots in memory (snapshot_oracle).
Development only; the product never imports it."""
