"""Test infrastructure the suite (tests/) and the benchmarks (loadtest/) share: real gateways, link proxies,
an echo upstream and the multi-region topology on loopback. Development only; the product never imports it."""
