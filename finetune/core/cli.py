"""Command-line flags from settings dataclasses: one flag per field, one --help group per dataclass, and
`--config FILE` for every script.

A group's docstring is its title; the docstring under each field is the flag's --help text (a flag several
scripts share, declared with flags.shared, has its meaning as the default text). A flag is the field's name
with dashes (`max_steps` -> `--max-steps`) unless the field's metadata gives `flag`; the rest of the metadata
(choices, nargs, action, metavar, const) goes to argparse as it is.

The settings of a run come from three places, the later winning: the fields' defaults, the `--config` file
(TOML, YAML or JSON; its keys are the fields' names, with dashes or underscores), the flags given.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
from pathlib import Path

from .errors import ArgumentParser, UserError, raise_if_problems

# metadata keys that are ours, not argparse's
OWN_METADATA = {"flag", "shared", "meaning"}
CONFIG_FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}


def class_source(cls) -> str:
    """The source of a top-level dataclass, read from the file its module had when the class was made: a
    dataclass's generated __init__ keeps that module's globals. (inspect.getsource asks sys.modules, which may
    hold another module by the time: evaluate.py imported as `evaluate` gives way to Hugging Face's package of
    that name when lm-eval runs in the same process.)"""
    path = getattr(cls.__init__, "__globals__", {}).get("__file__")
    if not path:
        return inspect.getsource(cls)
    source = Path(path).read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return ast.get_source_segment(source, node)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (Python keeps none at run time, so read the source)."""
    body = ast.parse(class_source(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(ast.literal_eval(following.value).split())
    return docs


class StoreOnce(argparse.Action):
    """A flag that takes one value where a second one would silently replace the first (--report-to
    tensorboard --report-to mlflow keeping only mlflow): given twice, it is refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(self, "given", None)
        if first is not None:
            raise UserError(f"{option_string} was given twice ({first!r}, then {values!r}), and the second would "
                            f"replace the first. HINT: give it once; several values go in one comma-separated list: "
                            f"{option_string} {first},{values}")
        self.given = values
        setattr(namespace, self.dest, values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where there is a default worth showing and the help doesn't say it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def own_fields(group) -> list[dataclasses.Field]:
    """The fields declared in `group` itself, in the order written."""
    own = group.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(group) if f.name in own]


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_of(f: dataclasses.Field, docs: dict[str, str]) -> str:
    """The docstring under the field, else the shared flag's meaning; a `%(default)s` in it is argparse's."""
    text = docs.get(f.name) or f.metadata.get("meaning", "")
    return text.replace("%", "%%").replace("%%(default)s", "%(default)s")


def build_arg_parser(groups, description: str, suppress_defaults: bool = False,
                     epilog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of the `groups` dataclasses, one --help group each, and --config. With
    suppress_defaults, only flags given on the command line appear in the parsed namespace (how a resume,
    and a --config file, tell what was given)."""
    parser = ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    for group_cls in groups:
        group = parser.add_argument_group(inspect.getdoc(group_cls))
        docs = field_docs(group_cls)
        for f in own_fields(group_cls):
            options = {k: v for k, v in f.metadata.items() if k not in OWN_METADATA}
            spec = {"help": help_of(f, docs), "dest": f.name,
                    "default": argparse.SUPPRESS if suppress_defaults else default_of(f)}
            if f.type == "bool":
                spec["action"] = "store_true"
            elif "choices" not in options and options.get("action", StoreOnce) is StoreOnce:
                spec["type"] = int if "int" in f.type else float if "float" in f.type else str
            group.add_argument(flag_of(f), **{**spec, **options})
    group = parser.add_argument_group("config file")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS if suppress_defaults else None,
                       help="read settings from a TOML, YAML or JSON file whose keys are these flags' names "
                            "(dashes or underscores); a flag given here wins over the file. What a run records "
                            "(the training run's train_config.json, prepare_data's meta.json, evaluate's "
                            "eval.json) is such a file")
    return parser


def parse_config(config_cls, make_parser, argv=None):
    """The settings (defaults < the --config file < the flags given), and the names of the fields set by the
    file or a flag (a resume keeps the rest from the checkpoint)."""
    args = vars(make_parser().parse_args(argv))  # every flag checked, and every default
    given = vars(make_parser(suppress_defaults=True).parse_args(argv))
    config_file = given.pop("config", None)
    args.pop("config", None)
    from_file = read_config_file(Path(config_file), config_cls) if config_file else {}
    return config_cls(**{**args, **from_file, **given}), set(from_file) | set(given)


def merge_resumed_config(cfg, saved: dict, explicit: set[str], run_control: set[str]):
    """On --resume, every flag not given on the command line (and not a run-control flag such as
    --resume itself) keeps the checkpoint's value."""
    merged = {name: saved[name] for name in (f.name for f in dataclasses.fields(cfg))
              if name not in explicit and name not in run_control and name in saved}
    return dataclasses.replace(cfg, **merged)


# -----------------------------------------------------------------------------
# --config FILE


def read_config_file(path: Path, config_cls) -> dict:
    """The settings a --config file gives, by field name, each checked against its field; every problem with
    the file in one UserError naming the file (and the key)."""
    table = load_config_table(path)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    problems, settings = [], {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            problems.append(f"unknown key {key!r}. HINT: "
                            + (f"did you mean {close[0]!r}? " if close else "")
                            + "the keys are the flags' names (see --help)")
        elif name in settings:
            problems.append(f"the key {key!r} is given twice (with dashes and with underscores). "
                            "HINT: keep one")
        else:
            value, problem = checked_value(fields[name], value, yaml=CONFIG_FORMATS[path.suffix.lower()] == "YAML")
            if problem:
                problems.append(f"{key!r} {problem}")
            settings[name] = value
    if len(problems) == 1:
        raise UserError(f"--config {path}: {problems[0]}")
    raise_if_problems(problems, f"--config {path}")
    return settings


def load_config_table(path: Path) -> dict:
    """The file's top-level table. A JSON file one of the scripts wrote with its settings under "settings"
    (meta.json, eval.json) gives that table."""
    kind = CONFIG_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--config {path}: not a .toml, .yaml, .yml or .json file. HINT: name the file after its "
                        "format, e.g. run.toml")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"--config {path} {what}. HINT: pass a {kind} file of settings, e.g. --config run.toml")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"--config {path} cannot be read ({why}). HINT: pass a readable UTF-8 {kind} file") from None
    table = parse_table(text, kind, path)
    if not isinstance(table, dict):
        raise UserError(f"--config {path} holds a {type(table).__name__}, not a table of settings. HINT: write one "
                        "setting per line, e.g. lr = 0.0001 (TOML) or lr: 0.0001 (YAML)")
    settings = table.get("settings")
    return settings if isinstance(settings, dict) and "format" in table else table


def parse_table(text: str, kind: str, path: Path):
    if kind == "TOML":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"--config {path} is not valid TOML ({exc}). HINT: check that line; strings are "
                            'quoted: model = "gpt2"') from None
    if kind == "JSON":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--config {path} is not valid JSON ({exc}). HINT: check that line") from None
    try:
        import yaml
    except ImportError:
        raise UserError(f"--config {path} is YAML, and reading YAML needs PyYAML, which is not installed. "
                        "HINT: pip install pyyaml, or write the file as TOML") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML ({' '.join(str(exc).split())}). HINT: check that "
                        "line") from None


TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
PLURALS = {bool: "true or false values", int: "whole numbers", float: "numbers", str: "strings"}


def checked_value(f: dataclasses.Field, value, yaml: bool = False):
    """(the value as the field holds it, None) or (value, what is wrong with it)."""
    optional, is_list, kind = field_kind(f)
    if value is None:
        return value, None if optional else "cannot be empty (null). HINT: give a value, or leave the key out"
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        return value, f"must be a list of {PLURALS[kind]}, got {value!r}. HINT: write it as [{json.dumps(value)}]"
    converted = []
    for item in items:
        if kind is float and yaml and isinstance(item, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                item = float(item)
            except ValueError:
                pass
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            return value, (f"must be {TYPE_NAMES[kind]}, got {item!r} ({type(item).__name__}). HINT: e.g. "
                           f"{example_of(kind)}")
        choices = f.metadata.get("choices")
        if choices and item not in choices:
            return value, f"must be one of {', '.join(map(str, choices))}, got {item!r}. HINT: pick one of those"
        converted.append(item)
    return (converted if is_list else converted[0]), None


def field_kind(f: dataclasses.Field) -> tuple[bool, bool, type]:
    """(None allowed, a list, the type of the value or of each item) from the field's annotation."""
    text = str(f.type)
    kind = bool if "bool" in text else int if "int" in text else float if "float" in text else str
    return "None" in text, text.startswith("list["), kind


def example_of(kind: type) -> str:
    return {bool: "true", int: "3", float: "0.0001", str: '"text" (quoted)'}[kind]
