"""YAML configs with `include:` and strict keys, plus the CLI plumbing every script shares.

    >>> from adlens.config import load_yaml
    >>> cfg = load_yaml("config/darkroom.yaml")        # {"env": {...}, "collect": {...}, ...}

Precedence, lowest first: the config dict at the top of a script < a YAML file given with
`--config` < command-line flags. Unknown keys are errors that name the key and the file.
"""

from __future__ import annotations

import argparse
import ast
import errno
import functools
import io
import itertools
import math
import os
import sys
import time
import tokenize
from pathlib import Path
from typing import NoReturn

import yaml

from adlens.errors import ConfigError, UserError

# Top-level sections a config file may hold (besides `include`); anything else is a misspelling.
SECTIONS = ("env", "collect", "model", "train", "analysis", "visualize")

# Bounds of keys that recur across the scripts, (low, high) inclusive, None = open; a script's own
# BOUNDS add to these. They refuse values no one can mean before anything is allocated or started.
_CORES = os.cpu_count() or 1
COMMON_BOUNDS = {
    "threads": (0, 4 * _CORES),
    "seed": (0, 2**31 - 1),
    "num_seeds": (1, 1000),
    "episodes": (1, 10_000),
    "workers": (1, 4096),
    "dpi": (20, 1200),
    "tasks_limit": (1, 100_000),
}


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
    unknown = sorted(k for k in merged if k not in SECTIONS and k != "_source")
    if unknown:
        raise UserError(f"unknown section(s) {unknown} in {path}; valid: {list(SECTIONS)}")
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


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError: exit code 2 through `run_cli`), not usage text."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def make_parser(doc: str) -> Parser:
    """A script's parser: its docstring as the description, `--debug` listed (run_cli handles it)."""
    parser = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _scalar(text: str):
    """An item of a list flag whose default is empty: a whole number, a finite float, or the text."""
    for cast in (int, finite_float):
        try:
            return cast(text)
        except (ValueError, argparse.ArgumentTypeError):
            pass
    return text


def finite_float(text: str) -> float:
    """A float flag's type: refuses nan and inf, which no setting here can mean."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


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
            kind = type(value[0]) if value else _scalar
            kw.update(nargs="+", type=finite_float if kind is float else kind)
        elif isinstance(value, float):
            kw["type"] = finite_float
        elif isinstance(value, int):
            kw["type"] = int
        else:
            kw["type"] = str
        parser.add_argument(*aliases.get(key, []), _flag(key), **kw)


def _type_ok(want, value) -> bool:
    if want is None:
        return True
    if isinstance(want, bool) or isinstance(value, bool):
        return isinstance(want, bool) and isinstance(value, bool)
    if isinstance(want, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(want))


def resolve(defaults: dict, args: argparse.Namespace, yaml_section: dict | None = None, bounds: dict | None = None,
            explicit: set | None = None, where: str = "config") -> dict:
    """defaults < YAML section < flags that were given; then every value is checked.

    A YAML value must have its default's type (a list's items too; no `null` unless the default is
    None); floats must be finite; keys in `bounds` (and COMMON_BOUNDS) must lie in their (low, high)
    range or, for a set, be one of its members. `explicit`, if given, receives the keys the YAML
    section or a flag set (what `--resume` compares against the saved run).
    """
    out = dict(defaults)
    if yaml_section:
        yaml_section = dict(yaml_section)
        check_keys(yaml_section, defaults, where)
        for key, value in yaml_section.items():
            want = defaults[key]
            if isinstance(want, list) and not isinstance(value, list):
                value = yaml_section[key] = [value]
            if isinstance(want, list):
                ok = all(_type_ok(want[0], v) if want else isinstance(v, (int, float, str)) for v in value)
            else:
                ok = _type_ok(want, value)
            if not ok:
                kind = f"a list of {type(want[0]).__name__}" if isinstance(want, list) and want else type(want).__name__
                raise UserError(f"config key {key!r} in {where} must be {kind}, got {value!r}")
        out.update(yaml_section)
        if explicit is not None:
            explicit.update(yaml_section)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
            if explicit is not None:
                explicit.add(key)
    check_values(out, {**COMMON_BOUNDS, **(bounds or {})})
    return out


def check_values(cfg: dict, bounds: dict) -> None:
    """Refuse non-finite floats anywhere in `cfg` and values outside `bounds` (see `resolve`)."""
    for key, value in cfg.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{_flag(key)} must be a finite number, got {v}")
            rule = bounds.get(key)
            if rule is None or v is None or isinstance(v, bool):
                continue
            if isinstance(rule, (set, frozenset)):
                if v not in rule:
                    raise ConfigError(f"{_flag(key)} must be one of {', '.join(sorted(map(str, rule)))}, got {v!r}")
                continue
            lo, hi = rule
            if not isinstance(v, (int, float)):
                raise ConfigError(f"{_flag(key)} must be a number, got {v!r}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                span = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
                raise ConfigError(f"{_flag(key)} must be {span}, got {v}")


def total_memory() -> int:
    """Bytes of physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse an allocation estimated at more than 90% of this machine's memory, before making it."""
    total = total_memory()
    if total and nbytes > 0.9 * total:
        raise UserError(f"{what} needs about {nbytes / 2**30:.1f} GiB by estimate, more than this machine's "
                        f"{total / 2**30:.1f} GiB of memory; {fix}")


def check_out(path: str | Path, flag: str = "--out", is_file: bool = False) -> Path:
    """Check, before any work, that the output folder (or the folder of an output file) can be created
    and written: not an existing regular file, a writable existing ancestor, names the file system
    accepts. Creates nothing that is left behind."""
    path = Path(path)
    folder = path.parent if is_file else path
    too_long = UserError(f"{flag} {path}: name too long for the file system")
    try:
        if is_file and path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        probe = folder
        while not probe.exists():
            if probe.is_symlink():
                raise UserError(f"{flag} {path}: {probe} is a broken link")
            probe = probe.parent
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise too_long from None
        raise UserError(f"{flag} {path}: {e.strerror}") from None
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} exists and is not a folder")
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    # temporary names are short (adlens.io), so only the total length needs room for them
    if any(len(os.fsencode(p)) > name_max for p in path.parts) or len(os.fsencode(str(path.absolute()))) > path_max - 64:
        raise too_long
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {probe}")
    if probe == folder:
        import tempfile

        try:
            fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=folder)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    return path


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


LEAD_GRACE_S = 10.0  # under torchrun, how long a process of rank > 0 leaves rank 0 to report an error


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_lead_process() -> bool:
    """False in the processes of rank > 0 under torchrun (RANK set by the launcher)."""
    return _rank() == 0


def report_and_exit(message: str) -> NoReturn:
    """Print `error: message` and exit with code 2. Under torchrun every process validates the same
    input, and rank 0 alone prints: another rank waits `LEAD_GRACE_S` first, in which the launcher,
    seeing rank 0 fail, stops it; if it is still running then, its error was its own and it says so."""
    if not is_lead_process():
        time.sleep(LEAD_GRACE_S)
        message = f"(rank {_rank()}) {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# File-system failures that are the machine's state, not a bug: one line, exit code 1.
_FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EIO}


def run_cli(main, argv=None) -> None:
    """Call `main(argv)`. A `UserError` (input that was checked and refused) becomes one line on
    stderr and exit code 2; a full disk or a denied write during the run, one line and exit code 1;
    Ctrl-C, "interrupted" and 130. Anything else is a bug and keeps its traceback. `--debug` (or
    ADLENS_DEBUG=1) shows the traceback of every error. Under torchrun rank 0 reports (`report_and_exit`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ADLENS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        report_and_exit(str(e))
    except OSError as e:
        if debug or e.errno not in _FS_ERRNOS:
            raise
        if is_lead_process():
            where = f": {e.filename}" if e.filename else ""
            print(f"error: {e.strerror}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
