"""Named configs and `--config.<path>=<value>` overrides, with errors a person can act on.

Every launcher takes `--config=<name>` (a module in `configs/` with `get_config()`) and any number
of `--config.<dotted.path>=<value>` overrides. Unknown keys and values of the wrong type are
rejected with the valid choices, before any work starts.
"""
import argparse
import difflib
import importlib
import pkgutil

from ml_collections import ConfigDict

import configs


class ConfigError(ValueError):
    """A config name, key or value that cannot be used."""


def available_configs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "base")


def load_config(name: str) -> ConfigDict:
    if name not in available_configs():
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(available_configs())}")
    return importlib.import_module(f"configs.{name}").get_config()


def _leaf_paths(cfg: ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ConfigDict):
            paths += _leaf_paths(value, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(text)


_PARSERS = {bool: _parse_bool, int: int, float: float, str: str}


def _parse_value(text: str, kind: type, path: str):
    if kind not in _PARSERS:
        raise ConfigError(f"--config.{path}: values of type {kind.__name__} cannot be set from the command line")
    try:
        return _PARSERS[kind](text)
    except ValueError:
        raise ConfigError(f"--config.{path}={text!r}: expected a value of type {kind.__name__}") from None


def apply_override(cfg: ConfigDict, path: str, text: str) -> None:
    """Set `cfg.<path>` from its command-line text, typed by the field's declared type."""
    leaves = _leaf_paths(cfg)
    if path not in leaves:
        close = difflib.get_close_matches(path, leaves, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(leaves)}"
        raise ConfigError(f"unknown config key {path!r}{hint}")
    *parents, key = path.split(".")
    node = cfg
    for parent in parents:
        node = node[parent]
    node[key] = _parse_value(text, node.get_type(key), path)


def config_from_args(argv: list[str] | None = None, *, description: str = "",
                     add_arguments=None) -> tuple[ConfigDict, argparse.Namespace]:
    """Parse `--config=<name>`, its overrides and a launcher's own flags (via `add_arguments`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help=f"one of: {', '.join(available_configs())}")
    if add_arguments is not None:
        add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config)
        for item in rest:
            if not item.startswith("--config.") or "=" not in item:
                raise ConfigError(f"unrecognised argument {item!r} (overrides look like --config.train.matrix_lr=0.01)")
            path, text = item[len("--config."):].split("=", 1)
            apply_override(cfg, path, text)
    except ConfigError as err:
        parser.error(str(err))
    return cfg, args
