"""Server metrics in Prometheus' text format, kept by hand (a few counters do not need a library)."""
import collections
import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request counts by endpoint and status, prompt and completion tokens, and a time-to-first-
    token histogram; gauges (slots, queue, tokens/s) are read from the scheduler when scraped."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()   # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                self.ttft_counts[i] += seconds <= bound

    def render(self, scheduler) -> str:
        with self._lock:
            lines = ["# TYPE nanochat_requests_total counter"]
            lines += [f'nanochat_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# TYPE nanochat_prompt_tokens_total counter", f"nanochat_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE nanochat_completion_tokens_total counter",
                      f"nanochat_completion_tokens_total {self.completion_tokens}",
                      "# TYPE nanochat_time_to_first_token_seconds histogram"]
            lines += [f'nanochat_time_to_first_token_seconds_bucket{{le="{b}"}} {c}'
                      for b, c in zip(TTFT_BUCKETS, self.ttft_counts)]
            lines += [f'nanochat_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                      f"nanochat_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"nanochat_time_to_first_token_seconds_count {self.ttft_count}"]
        gauges = {"slots": scheduler.pool.slots, "active_slots": len(scheduler.active),
                  "queue_depth": scheduler.waiting.qsize(), "generated_tokens_total": scheduler.tokens_generated,
                  "tokens_per_second": round(scheduler.tokens_per_second(), 3)}
        for name, value in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE nanochat_{name} {kind}", f"nanochat_{name} {value}"]
        return "\n".join(lines) + "\n"
