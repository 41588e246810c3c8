"""Prometheus metrics of a server, from the engine process's counters when /metrics is scraped.

Counts and gauges are the scheduler's and the engine loop's own tallies, as the engine process
last sent them with a step (one source of truth, nothing to keep in sync); step times come with
them and are drained into a histogram.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "qwen3_moe"
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, state):
        self.state = state
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(f"{PREFIX}_step_seconds", "Wall time of one engine step", buckets=STEP_BUCKETS,
                                      registry=self.registry)
        self.registry.register(_Collector(state))

    def render(self) -> bytes:
        for t in self.state.engine.take_step_seconds():
            self.step_seconds.observe(t)
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        ready = GaugeMetricFamily(f"{PREFIX}_ready", "1 when the artifact is loaded and serving")
        ready.add_metric([], float(self.state.status == "ready"))
        yield ready
        st = self.state.engine.stats
        if not st:
            return

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            g.add_metric([], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            c.add_metric([], float(value))
            return c

        yield gauge("requests_running", "Requests admitted to a DP group (prefilling or decoding)", st["running"])
        yield gauge("requests_queued", "Requests waiting for KV pages or a sequence slot", st["waiting"])
        yield counter("prompt_tokens", "Prompt tokens of admitted requests", st["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated", st["generated_tokens"])
        yield counter("steps", "Engine steps run", st["steps"])
        finished = CounterMetricFamily(f"{PREFIX}_requests_finished", "Requests finished, by reason",
                                       labels=["reason"])
        for reason, n in st["finished"]:
            finished.add_metric([reason], float(n))
        yield finished
        yield gauge("padding_efficiency", "Real tokens / padded tokens over every step so far",
                    st["real_tokens"] / st["padded_tokens"] if st["padded_tokens"] else 0.0)
        yield gauge("kv_pages_used", "KV cache pages held by requests (all DP groups)", st["pages_used"])
        yield gauge("kv_pages_free", "KV cache pages free (all DP groups)", st["pages_total"] - st["pages_used"])
        yield gauge("compiles_after_load", "Backend compilations since load (should stay 0)",
                    st["compiles_after_load"])
        yield counter("preemptions", "Requests preempted (pages freed, prefilled again later)", st["preemptions"])
        yield counter("prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache instead of computed",
                      st["prefix_hit_tokens"])
        yield gauge("prefix_cache_pages", "KV pages in the prefix cache, held or idle (all DP groups)",
                    st["prefix_cached_pages"])
        yield counter("prefix_cache_evictions", "Idle cached KV pages evicted to make room", st["prefix_evictions"])
        # Host work per step: a steady decode step is repeated on the device and sends nothing.
        yield counter("steps_repeated", "Steps run again on the device, one position on, with nothing "
                                        "planned or sent from the host", st["repeats"])
        sent = CounterMetricFamily(f"{PREFIX}_inputs_sent", "Packed step inputs sent from the host, by input",
                                   labels=["input"])
        for name, n in st["transfers"]:
            sent.add_metric([name], float(n))
        yield sent
