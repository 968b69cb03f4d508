"""Prometheus metrics of one server. Each server has its own registry, so engines in one process don't mix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from tpfleet.engine.llm_engine import EngineSnapshot

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tpfleet_requests", "Finished requests, by finish reason", ["reason"], registry=r)
        self.rejected = Counter("tpfleet_rejected_requests", "Requests answered with a 4xx, by reason (see "
                                "tpfleet.server.guard)", ["reason"], registry=r)
        self.prompt_tokens = Counter("tpfleet_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("tpfleet_cached_prompt_tokens", "Prompt tokens served by the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("tpfleet_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("tpfleet_num_running_reqs", "Requests in the running batch", registry=r)
        self.queued = Gauge("tpfleet_num_queue_reqs", "Requests waiting for admission", registry=r)
        self.kv_usage = Gauge("tpfleet_kv_cache_usage", "Fraction of KV-cache blocks in use", registry=r)
        self.preemptions = Gauge("tpfleet_num_preemptions", "Preemptions since start", registry=r)
        self.ttft = Histogram("tpfleet_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tpfleet_time_per_output_token_seconds", "Time between output tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tpfleet_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def set_engine_state(self, snapshot: EngineSnapshot) -> None:
        self.running.set(snapshot.num_running_reqs)
        self.queued.set(snapshot.num_waiting_reqs)
        self.kv_usage.set(snapshot.kv_cache_usage)
        self.preemptions.set(snapshot.num_preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
