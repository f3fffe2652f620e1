"""d32: nanochat's depth-32 model (sizes in the README's config table)."""
from configs.base import base_config


def get_config():
    c = base_config(32)
    c.train.device_batch_size = 8
    return c
