"""Prometheus metrics of one gateway: requests by route and status, latency, upstream errors by kind.

Each gateway has its own registry (two in one process, as in the tests, never
share counts). Routes are labelled by their template, never by a path a
caller chose, so the label set stays small.
"""

from __future__ import annotations

from typing import Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "safety_checker_gateway"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by route and HTTP status",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer a request, by route",
            ["route"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Requests Triton did not answer with decisions, by kind (refused, unavailable, internal)",
            ["kind"],
            registry=self.registry,
        )
        self.images = Counter(f"{PREFIX}_images", "Images answered, by decision", ["flagged"], registry=self.registry)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being checked now", registry=self.registry)

    def answered(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def decided(self, flagged: int, passed: int) -> None:
        self.images.labels("true").inc(flagged)
        self.images.labels("false").inc(passed)

    def page(self) -> Tuple[bytes, str]:
        """The exposition page and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
