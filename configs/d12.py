"""d12: nanochat's depth-12 model (sizes in the README's config table)."""
from configs.base import base_config


def get_config():
    c = base_config(12)
    return c
