"""d26: nanochat's depth-26 model (sizes in the README's config table)."""
from configs.base import base_config


def get_config():
    c = base_config(26)
    c.train.device_batch_size = 16
    return c
