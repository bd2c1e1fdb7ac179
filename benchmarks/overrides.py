"""Config overrides as train.py reads them: `FIELD=VALUE`, parsed by the field's own type.

`--ab model.bn_remat=false` and the memory sweep change a copy of the benchmark's
config with the same parsers `--config.FIELD=VALUE` goes through
(`ml_collections.config_flags`), so a value means the same in both places.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path


def split(text: str) -> tuple[str, str]:
    """`"model.bn_remat=false"` -> `("model.bn_remat", "false")`."""
    field, sep, value = text.partition("=")
    field = field.strip().removeprefix("--").removeprefix("config.")
    if not sep or not field:
        raise ValueError(f"an override reads FIELD=VALUE (e.g. model.bn_remat=false), "
                         f"got {text!r}")
    return field, value


def apply(config: ml_collections.ConfigDict, text: str
          ) -> tuple[ml_collections.ConfigDict, str, Any]:
    """A copy of `config` with the override `text` (FIELD=VALUE), the field and its new value.

    The value is parsed as `--config.FIELD=VALUE` would be: booleans from true / false,
    numbers, strings, tuples as "(a, b)". An unknown field or a bad value is a ValueError.
    """
    field, value = split(text)
    argv = ["override", f"--config.{field}={value}"]
    flag_values = flags.FlagValues()  # private: nothing lands in absl's global flags
    try:  # defining the flag parses `argv` already; calling it checks the rest
        config_flags.DEFINE_config_dict("config", copy.deepcopy(config),
                                        flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
    except (AttributeError, KeyError):
        raise ValueError(f"override {text!r}: the config has no field {field!r}") from None
    except flags.Error as e:
        raise ValueError(f"override {text!r}: {e}") from None
    return flag_values.config, field, get(flag_values.config, field)


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    """The value at a dotted path (`model.bn_remat`)."""
    return config_path.get_value(field, config)


def replaced(config: ml_collections.ConfigDict, values: Mapping[str, Any]
             ) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted path set to its (already typed) value."""
    config = copy.deepcopy(config)
    for field, value in values.items():
        config_path.set_value(field, config, value)
    return config
