"""Every test process sees 8 CPU devices, so sharded and single-device runs can be compared
in one process (a 1-device mesh is built from the first device)."""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
