"""Continuous batching: request slots over one KV cache (slots.py), the scheduler thread that owns
the device (scheduler.py), and text streaming helpers (text.py)."""
from nanochat_jax.serving.scheduler import QueueFull, Request, Scheduler
from nanochat_jax.serving.slots import Sampling, SlotPool
from nanochat_jax.serving.text import StopMatcher, StreamingDecoder

__all__ = ["QueueFull", "Request", "Sampling", "Scheduler", "SlotPool", "StopMatcher", "StreamingDecoder"]
