"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms.

Written out by hand (a few dozen lines) rather than pulling in prometheus_client:
counters only go up, gauges are set, histograms keep cumulative bucket counts
``_bucket{le=...}`` plus ``_sum`` and ``_count``, as the format specifies.
"""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

HELP = {
    "polymodal_requests_total": ("counter", "HTTP requests by endpoint and status code"),
    "polymodal_prompt_tokens_total": ("counter", "prompt tokens prefilled"),
    "polymodal_generation_tokens_total": ("counter", "tokens generated"),
    "polymodal_prefix_cache_tokens_total": ("counter", "prompt tokens whose K/V came from the prefix cache"),
    "polymodal_queue_depth": ("gauge", "requests waiting for a batch row"),
    "polymodal_running_sequences": ("gauge", "sequences in the running batch"),
    "polymodal_batch_size": ("histogram", "rows per decode step"),
    "polymodal_prefill_batch_size": ("histogram", "requests per prefill forward"),
    "polymodal_decode_step_seconds": ("histogram", "wall time of one batched decode step"),
    "polymodal_prefill_seconds": ("histogram", "wall time of one prompt prefill"),
    "polymodal_request_latency_seconds": ("histogram", "request latency, arrival to last byte"),
    "polymodal_time_to_first_token_seconds": ("histogram", "arrival to first generated token"),
    "polymodal_time_per_output_token_seconds": ("histogram", "mean time between generated tokens of a request"),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, dict[str, float]] = {}
        self.gauges: dict[str, dict[str, float]] = {}
        self.hists: dict[str, dict[str, list]] = {}  # name -> labels -> [bucket counts, sum, count]

    def inc(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            d = self.counters.setdefault(name, {})
            key = _labels(labels)
            d[key] = d.get(key, 0) + value

    def set_gauge(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self.gauges.setdefault(name, {})[_labels(labels)] = value

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = BATCH_BUCKETS if name.endswith("batch_size") else LATENCY_BUCKETS
        with self._lock:
            h = self.hists.setdefault(name, {}).setdefault(_labels(labels), [[0] * len(buckets), 0.0, 0, buckets])
            i = bisect.bisect_left(buckets, value)
            if i < len(buckets):
                h[0][i] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        out = []
        with self._lock:
            for store, kind in ((self.counters, "counter"), (self.gauges, "gauge")):
                for name, series in sorted(store.items()):
                    out += [f"# HELP {name} {HELP.get(name, (kind, name))[1]}", f"# TYPE {name} {kind}"]
                    out += [f"{name}{k} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self.hists.items()):
                out += [f"# HELP {name} {HELP.get(name, ('', name))[1]}", f"# TYPE {name} histogram"]
                for key, (counts, total, n, buckets) in sorted(series.items()):
                    inner = key[1:-1] + "," if key else ""
                    acc = 0
                    for b, c in zip(buckets, counts):
                        acc += c
                        out.append(f'{name}_bucket{{{inner}le="{b:g}"}} {acc}')
                    out.append(f'{name}_bucket{{{inner}le="+Inf"}} {n}')
                    out.append(f"{name}_sum{key} {total:g}")
                    out.append(f"{name}_count{key} {n}")
        return "\n".join(out) + "\n"
