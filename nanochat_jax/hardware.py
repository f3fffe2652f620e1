"""What the devices can do: peak bf16 matmul throughput and memory bandwidth by device kind, and
memory in use.

MFU divides achieved model FLOP/s by the dense (no sparsity) bf16 peak of the devices. CPUs have
no meaningful peak here, so MFU is None on CPU.
"""
import resource
import sys

import jax

# (substring of jax's device_kind, dense bf16 FLOP/s). First match wins: specific names first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
)


def _lookup(table, device) -> float | None:
    """The first entry of `table` whose name is in the device's kind; None on CPU or if unlisted."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    return next((value for name, value in table if name in device.device_kind), None)


def peak_flops(device=None) -> float | None:
    """Dense bf16 peak of one device, or None where unknown (CPU, unlisted GPUs)."""
    return _lookup(PEAK_BF16_FLOPS, device)


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, device=None) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * num_devices)


# (substring of jax's device_kind, memory bytes/s). First match wins: specific names first.
MEMORY_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("GH200", None),  # sold with HBM3 and with HBM3e; the name does not say which
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("H200", 4.8e12),
    ("B200", 8.0e12),
    ("A100 80GB PCIe", 1.94e12),
    ("A100-SXM4-80GB", 2.0e12),
    ("A100", 1.55e12),  # the 40 GB parts
    ("TPU v4", 1.2e12),
    ("TPU v5 lite", 0.82e12),
    ("TPU v5", 2.76e12),
    ("TPU v6 lite", 1.64e12),
)


def memory_bandwidth(device=None) -> float | None:
    """Memory bytes/s of one device, or None where unknown (CPU, unlisted devices)."""
    return _lookup(MEMORY_BANDWIDTH, device)


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the most loaded local device; on CPU, the process's peak RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
