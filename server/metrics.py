"""Prometheus metrics of the front end (prometheus-client, default registry); the engine core's
switches and policy decisions reach them over the link."""
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
_SWITCH_BUCKETS = (.01, .025, .05, .1, .15, .25, .5, 1, 2.5, 5, 10, 30, 120)
SWITCH_DOWNTIME = Histogram("remp_switch_downtime_seconds", "Pause request to the first step at the new topology",
                            buckets=_SWITCH_BUCKETS)
SWITCH_PAUSE = Histogram("remp_switch_pause_seconds", "Step boundary to serving again (the engine stopped)",
                         buckets=_SWITCH_BUCKETS)
SWITCH_STALL = Histogram("remp_switch_stall_seconds",
                         "Longest extra wait of an in-flight stream across a switch (beyond its inter-token time)",
                         buckets=_SWITCH_BUCKETS)
SWITCH_DRAIN = Histogram("remp_switch_drain_seconds", "Drain mode: admission closed until running requests finished",
                         buckets=_SWITCH_BUCKETS)
SWITCH_STAGING = Histogram("remp_switch_staging_seconds", "New shards built and filled while serving went on",
                           buckets=_SWITCH_BUCKETS)
POLICY_DECISIONS = Counter("remp_policy_decisions_total", "Adaptive policy observations", ["action"])
RESTARTS = Counter("remp_restarts_total", "Engine restarts after a rank was lost (torchrun re-formed the world)")
RECOVERY = Histogram("remp_recovery_seconds", "Engine core lost to serving again (after a restart)",
                     buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300))


def bind_engine(engine) -> None:
    """Gauges read the engine's load (as last reported) when scraped."""
    QUEUE.set_function(lambda: engine.load().queued)
    RUNNING.set_function(lambda: engine.load().running)
    KV_FREE.set_function(lambda: engine.load().kv_blocks_free)
    KV_USED.set_function(lambda: engine.load().kv_blocks_used)


def observe_switch(record, phases: dict[str, float]) -> None:
    """A switch's pb.SwitchRecord and its phase seconds, as the engine core reported them."""
    SWITCHES.labels("committed" if record.committed else "rolled_back").inc()
    for phase, seconds in phases.items():
        SWITCH_PHASE.labels(phase).observe(seconds)
    if record.committed:
        for histogram, value in ((SWITCH_DOWNTIME, record.downtime_s), (SWITCH_PAUSE, record.pause_s),
                                 (SWITCH_STALL, record.stall_s), (SWITCH_STAGING, record.staging_s)):
            histogram.observe(value)
        if record.mode == "drain":
            SWITCH_DRAIN.observe(record.drain_s)


def serve_metrics(port: int, host: str) -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (``port`` 0 picks one)."""
    httpd, _ = start_http_server(port, addr=host)
    return httpd.server_port
