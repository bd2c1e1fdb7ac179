"""The entry scripts' flag parsing, with a bad `--config.FIELD=VALUE` as one line.

absl and ml_collections answer a misspelt override (`--config.learnin_rate=0.1`)
with a traceback, and a value of the wrong type (`--config.batch_size=abc`) with a
two-line FATAL message. `parse_flags`, given to `app.run(main, flags_parser=...)`,
answers every flag error in one line instead: for an override, the field, the
closest valid field or the type it takes, and exits with status 2 (as a bad config
does) before anything is imported or compiled.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any

from absl import flags
import ml_collections
from ml_collections.config_flags import config_path

_OVERRIDE = re.compile(r"^--?(?:no)?([A-Za-z_]\w*)\.([\w.]+)(?:=(.*))?$", re.S)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS,
                config_flag: str = "config") -> list[str]:
    """absl's parsing of `argv`; a bad flag prints one `error:` line and exits with 2."""
    try:
        return flag_values(argv)
    except (flags.Error, KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
        print(f"error: {explain(argv, e, flag_values, config_flag)}", file=sys.stderr)
        sys.exit(2)


def explain(argv: list[str], error: Exception, flag_values: flags.FlagValues,
            config_flag: str = "config") -> str:
    """One line for `error`, raised while parsing `argv`: what is wrong and the fix."""
    overrides = [(m[2], m[3]) for m in map(_OVERRIDE.match, argv)
                 if m and m[1] == config_flag]
    config = _base_config(argv, flag_values, config_flag) if overrides else None
    if config is not None:
        for path, value in overrides:
            line = (_unknown_field(config, path, config_flag)
                    or _bad_value(config, path, value, flag_values, config_flag))
            if line:
                return line
    return _one_line(error)


def _base_config(argv: list[str], flag_values: flags.FlagValues,
                 config_flag: str) -> ml_collections.ConfigDict | None:
    """The config file named on the command line, without its overrides (None: none)."""
    spec = None
    for i, arg in enumerate(argv):
        if re.match(rf"^--?{config_flag}=", arg):
            spec = arg.split("=", 1)[1]
        elif re.match(rf"^--?{config_flag}$", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None or config_flag not in flag_values:
        return None
    try:
        config = flag_values[config_flag].parser.parse(spec)
    except Exception:  # noqa: BLE001 - the config file itself is the problem
        return None
    return config if isinstance(config, ml_collections.ConfigDict) else None


def _unknown_field(config: ml_collections.ConfigDict, path: str, config_flag: str) -> str:
    """The line for an override naming no field of `config` ('' when it names one)."""
    node: Any = config
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        where = ".".join([config_flag, *parts[:i]])
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"--{config_flag}.{path}: {where} is a value, not a group of fields: "
                    f"set --{where}=VALUE")
        fields = sorted(node.keys())
        close = difflib.get_close_matches(part, fields, n=1, cutoff=0.6)
        if close:
            fix = ".".join([config_flag, *parts[:i], close[0], *parts[i + 1:]])
            return f"--{config_flag}.{path}: {where} has no field {part!r}: did you mean --{fix}?"
        return (f"--{config_flag}.{path}: {where} has no field {part!r}; its fields are "
                f"{', '.join(fields)}")
    return ""


def _bad_value(config: ml_collections.ConfigDict, path: str, value: str | None,
               flag_values: flags.FlagValues, config_flag: str) -> str:
    """The line for an override whose value its field's type refuses ('' when accepted)."""
    name = f"{config_flag}.{path}"
    if value is None or name not in flag_values:
        return ""
    try:
        flag_values[name].parser.parse(value)
    except (flags.Error, TypeError, ValueError, SyntaxError):
        kind = getattr(config_path.get_type(path, config), "__name__", "value")
        current = config_path.get_value(path, config)
        shown = f"'{current}'" if isinstance(current, tuple) else current
        example = f" (e.g. --{name}={shown})" if current is not None else ""
        article = "an" if kind[0] in "aeiou" else "a"
        return f"--{name}={value}: {path} takes {article} {kind}{example}, not {value!r}"
    return ""


def _one_line(error: Exception) -> str:
    """The line that says most of `error`: a config file's own error ends its traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if "Traceback (most recent call last)" in str(error):
        return f"{lines[0].rstrip(':')} {lines[-1]}"
    return lines[0]
