"""Prometheus metrics, exported by Ray's metrics agent (``ray_vlm_*`` on each node's metrics port).

Ray Serve adds the deployment, replica and application tags itself. Created lazily, once per
process, so importing this module outside a Ray worker costs nothing.
"""

from __future__ import annotations

import functools

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
IMAGE_BOUNDARIES_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class _Metrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("vlm_requests", description="HTTP requests by route and status code",
                                tag_keys=("route", "code"))
        self.errors = Counter("vlm_errors", description="requests answered with an error, by route and code",
                              tag_keys=("route", "code"))
        self.tokens = Counter("vlm_tokens", description="tokens by kind: prompt, completion, image",
                              tag_keys=("kind",))
        self.images = Counter("vlm_images", description="images and video frames received")
        self.latency = Histogram("vlm_request_latency_s", description="request latency (s)",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.ttft = Histogram("vlm_time_to_first_token_s", description="time to the first streamed token (s)",
                              boundaries=LATENCY_BOUNDARIES_S)
        self.batch_size = Histogram("vlm_batch_size", description="rows per batch", boundaries=BATCH_BOUNDARIES,
                                    tag_keys=("stage",))
        self.cache = Counter("vlm_image_cache", description="image-feature cache lookups by result (hit/miss) and "
                             "layer (ingress: keyed by the image's bytes; encoder: keyed by its pixels)",
                             tag_keys=("result", "layer"))
        self.image_latency = Histogram(
            "vlm_image_latency_s", boundaries=IMAGE_BOUNDARIES_S, tag_keys=("cache",),
            description="per image part, seconds from the start of its fetch to its features in the ingress "
                        "(hit: a repeated image, found by its bytes' hash; miss: decoded and encoded)")


@functools.cache
def get() -> _Metrics:
    return _Metrics()


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` (e.g. ``ray_vlm_requests_total``) whose labels
    include ``labels``, in a Prometheus text exposition (what a ``/metrics`` scrape returns)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
