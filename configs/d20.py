"""d20: nanochat's depth-20 model (sizes in the README's config table)."""
from configs.base import base_config


def get_config():
    c = base_config(20)
    return c
