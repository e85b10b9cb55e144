"""YAML configs with `include:` and strict keys, plus the CLI plumbing every script shares.

    >>> from adlens.config import load_yaml
    >>> cfg = load_yaml("config/darkroom.yaml")        # {"env": {...}, "collect": {...}, ...}

Precedence, lowest first: the config dict at the top of a script < a YAML file given with
`--config` < command-line flags. Unknown keys are errors that name the key and the file.
"""

from __future__ import annotations

import argparse
import ast
import functools
import itertools
import io
import os
import sys
import tokenize
from pathlib import Path

import yaml

from adlens.errors import UserError


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config; `include: [a.yaml, ...]` (relative to the file) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise UserError(f"config include cycle at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    includes = data.pop("include", []) or []
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _merge(merged, load_yaml(path.parent / inc, _seen + (path.resolve(),)))
    merged = _merge(merged, data)
    merged["_source"] = str(path)
    return merged


def check_keys(section: dict, allowed, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where}; valid: {sorted(allowed)}")


def section(cfg: dict, name: str, allowed) -> dict:
    """One section of a loaded YAML config, its keys checked against `allowed`."""
    sec = cfg.get(name, {}) or {}
    if not isinstance(sec, dict):
        raise UserError(f"section {name!r} in {cfg.get('_source', 'config')} must be a mapping")
    check_keys(sec, allowed, f"section {name!r} of {cfg.get('_source', 'config')}")
    return dict(sec)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def key_comments(defaults: dict, where: dict | None = None) -> dict[str, str]:
    """The comment that describes each key where a module declares the dict `defaults`: the `# ...`
    after the key's value, or the comment lines right above the key.

    A config key is then described once, beside its default, and `--help` shows that text (tyro reads
    dataclass field comments the same way). The declaring module is found by identity among the
    globals `where` (the caller's, usually), else among the loaded modules outside the Python
    installation; {} when there is none (a dict built at run time).
    """
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    modules = (vars(m) for m in list(sys.modules.values()) if str(getattr(m, "__file__", None) or "").endswith(".py")
               and not str(m.__file__).startswith(prefixes))  # fmt: skip
    for space in itertools.chain([where] if where is not None else [], modules):
        names = [n for n, v in list(space.items()) if v is defaults]
        path = space.get("__file__") or ""
        if names and path.endswith(".py"):
            for name in names:
                found = _dict_comments(str(Path(path).resolve()), name)
                if found is not None:
                    return found
    return {}


@functools.lru_cache(maxsize=64)
def _dict_comments(path: str, name: str) -> dict[str, str] | None:
    """{key: comment} of the dict literal assigned to `name` at the top level of the file `path`."""
    source = Path(path).read_text()
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    trailing = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if not t.line.lstrip().startswith("#")}
    standalone = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.line.lstrip().startswith("#")}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if isinstance(getattr(node, "value", None), ast.Dict) and any(isinstance(t, ast.Name) and t.id == name for t in targets):
            out = {}
            for k, v in zip(node.value.keys, node.value.values):
                if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                    continue
                above, line = [], k.lineno - 1
                while line in standalone and line > node.lineno:  # a comment block right above the key
                    above.insert(0, standalone[line])
                    line -= 1
                text = trailing.get(v.end_lineno) or " ".join(above)
                if text:
                    out[k.value] = text
            return out
    return None


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict, help: dict | None = None, aliases: dict | None = None) -> None:
    """One `--some-key` flag per key of a script's config dict, typed by its default value; its help
    is `help[key]` if given, else the comment beside the key where the dict is declared (`key_comments`).

    aliases: extra flag names per key, e.g. {"compression_ratio": ["--ratio"]}.
    """
    help = key_comments(defaults, sys._getframe(1).f_globals) | {k: v.replace("%%", "%") for k, v in (help or {}).items()}
    aliases = aliases or {}
    for key, value in defaults.items():
        text = help.get(key, "").replace("%", "%%")  # argparse formats help strings with %
        kw: dict = {"dest": key, "default": None, "help": f"{text} (default: {value})".strip()}
        if isinstance(value, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(value, (list, tuple)):
            kw.update(nargs="+", type=type(value[0]) if value else str)
        elif isinstance(value, (int, float)):
            kw["type"] = type(value)
        else:
            kw["type"] = str
        parser.add_argument(*aliases.get(key, []), _flag(key), **kw)


def resolve(defaults: dict, args: argparse.Namespace, yaml_section: dict | None = None) -> dict:
    """defaults < YAML section < flags that were given."""
    out = dict(defaults)
    if yaml_section:
        check_keys(yaml_section, defaults, "config")
        for key, value in list(yaml_section.items()):
            want = defaults[key]
            if isinstance(want, list) and not isinstance(value, list):
                value = yaml_section[key] = [value]
            ok = value is None or want is None or isinstance(value, type(want)) or (isinstance(want, float) and isinstance(value, int))
            if isinstance(want, bool) != isinstance(value, bool) and value is not None:
                ok = False
            if not ok:
                raise UserError(f"config key {key!r} must be {type(want).__name__}, got {value!r} ({type(value).__name__})")
        out.update(yaml_section)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def none_or(value, cast):
    """'none'/'' -> None, else cast(value): for optional flags such as a checkpoint path."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    return cast(value)


def default_threads() -> int:
    """Half the cores this process may use, at least 1: timed runs leave room for whatever else runs."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def pin_threads(n: int) -> int:
    """Set torch's CPU thread count (0 = `default_threads()`) and return it; timed stages call this."""
    import torch

    n = n or default_threads()
    torch.set_num_threads(n)
    return n


def run_cli(main, argv=None) -> None:
    """Call `main(argv)`; user errors become one line on stderr and exit code 2."""
    try:
        main(argv)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
