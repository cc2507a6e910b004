"""Prometheus metrics of the front end (prometheus-client, default registry)."""
from prometheus_client import Counter, Gauge, Histogram, start_http_server

TTFT = Histogram("remp_ttft_seconds", "Time to first token", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
TPOT = Histogram("remp_tpot_seconds", "Time per output token after the first",
                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5))
TOKENS = Counter("remp_generated_tokens_total", "Tokens generated")
REQUESTS = Counter("remp_requests_total", "Finished requests", ["finish_reason"])
QUEUE = Gauge("remp_queue_depth", "Requests waiting for admission")
RUNNING = Gauge("remp_running_requests", "Requests in the running batch")
KV_USED = Gauge("remp_kv_blocks_used", "KV cache blocks in use")
KV_FREE = Gauge("remp_kv_blocks_free", "KV cache blocks free")
SWITCHES = Counter("remp_switches_total", "Topology switches", ["outcome"])
SWITCH_PHASE = Histogram("remp_switch_phase_seconds", "Seconds per reconfiguration phase", ["phase"],
                         buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
SWITCH_DOWNTIME = Histogram("remp_switch_downtime_seconds", "Pause to first token at the new topology",
                            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30))
POLICY_DECISIONS = Counter("remp_policy_decisions_total", "Adaptive policy observations", ["action"])


def bind_engine(engine) -> None:
    """Gauges read the engine's state when scraped."""
    QUEUE.set_function(lambda: engine.load().queued)
    RUNNING.set_function(lambda: engine.load().running)
    KV_FREE.set_function(lambda: engine.load().kv_blocks_free)
    KV_USED.set_function(lambda: engine.load().kv_blocks_used)


def serve_metrics(port: int, host: str) -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (``port`` 0 picks one)."""
    httpd, _ = start_http_server(port, addr=host)
    return httpd.server_port
