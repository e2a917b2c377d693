"""The node's Prometheus metrics, read by the reference Python client's
text parser (`prometheus_client.parser`): every family parses with its
declared type, histograms are consistent, and no label carries an
identifier from a request."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import create_room, q, send_text


def families(api) -> dict:
    resp = api.request("GET", "/metrics")
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def test_metrics_parse_and_histograms_are_consistent(server, api, user):
    if server.kind != "tessera":
        pytest.skip("Synapse serves metrics on a listener of its own, when enabled")
    room = create_room(api, user)
    send_text(api, user, room, "counted")
    assert api.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b", user.access_token).status_code == 200
    fams = families(api)

    requests_total = fams["tessera_http_requests"]
    assert requests_total.type == "counter"
    endpoints = {s.labels["endpoint"] for s in requests_total.samples}
    assert "/_matrix/client/rooms/{room}/send/{kind}/{txn}" in endpoints
    assert "/_matrix/client/rooms/{room}/messages" in endpoints
    for s in requests_total.samples:
        assert set(s.labels) == {"method", "endpoint", "code"}, s
        assert not any(c in s.labels["endpoint"] for c in "!@$#:"), s
        assert s.labels["code"].isdigit(), s

    for name in ("tessera_http_request_duration_seconds", "tessera_store_operation_duration_seconds"):
        fam = fams[name]
        assert fam.type == "histogram"
        series: dict = {}
        for s in fam.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, {"buckets": []})
            if s.name.endswith("_bucket"):
                series[key]["buckets"].append((float(s.labels["le"]), s.value))
            else:
                series[key][s.name.rsplit("_", 1)[1]] = s.value
        assert series, name
        for key, h in series.items():
            bounds = [b for b, _ in h["buckets"]]
            counts = [c for _, c in h["buckets"]]
            assert bounds == sorted(bounds) and math.isinf(bounds[-1]), (name, key, bounds)
            assert counts == sorted(counts), (name, key, counts)
            assert counts[-1] == h["count"], (name, key)
            assert h["sum"] >= 0, (name, key)

    for name, kind in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("tessera_sync_waiting", "gauge"),
        ("tessera_http_requests_in_flight", "gauge"),
    ]:
        assert fams[name].type == kind, name
    # This scrape is a request in flight.
    assert fams["tessera_http_requests_in_flight"].samples[0].value >= 1
