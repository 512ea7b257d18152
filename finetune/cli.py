"""Command-line flags from a config dataclass: the docstring under each field is its --help text.

The script lists its flags by name, grouped (`FLAG_GROUPS`), so grepping a flag finds the line that
maps it to its field; a flag's field is its name without the dashes (`--max-steps` -> `max_steps`)
unless `FLAG_OPTIONS` gives a `dest`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect

from .errors import ArgumentParser


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (Python keeps none at run time, so read the source)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(ast.literal_eval(following.value).split())
    return docs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where there is a default worth showing and the help doesn't say it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def field_of(flag: str, options: dict) -> str:
    return options.get(flag, {}).get("dest") or flag[2:].replace("-", "_")


def build_arg_parser(config_cls, groups: dict[str, tuple[str, ...]], options: dict[str, dict], description: str,
                     suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per field of `config_cls`. With suppress_defaults, only flags given on the command line
    appear in the parsed namespace (how a resume tells what was given)."""
    defaults = config_cls()
    docs = field_docs(config_cls)
    kinds = {f.name: f.type for f in dataclasses.fields(config_cls)}
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            name = field_of(flag, options)
            kind = kinds[name]
            spec = {"help": docs[name].replace("%", "%%"), "dest": name,
                    "default": argparse.SUPPRESS if suppress_defaults else getattr(defaults, name)}
            if kind == "bool":
                spec["action"] = "store_true"
            elif "choices" not in options.get(flag, {}) and "action" not in options.get(flag, {}):
                spec["type"] = int if "int" in kind else float if "float" in kind else str
            spec.update(options.get(flag, {}))
            group.add_argument(flag, **spec)
    if set(kinds) - {field_of(f, options) for flags in groups.values() for f in flags}:
        raise AssertionError("every config field needs a flag in FLAG_GROUPS")
    return parser


def parse_config(config_cls, make_parser, argv=None):
    """The config, and the names of the fields whose flags were given explicitly (a resume keeps the rest)."""
    args = make_parser().parse_args(argv)
    explicit = set(vars(make_parser(suppress_defaults=True).parse_args(argv)))
    return config_cls(**vars(args)), explicit


def merge_resumed_config(cfg, saved: dict, explicit: set[str], run_control: set[str]):
    """On --resume, every flag not given on the command line (and not a run-control flag such as
    --resume itself) keeps the checkpoint's value."""
    merged = {name: saved[name] for name in (f.name for f in dataclasses.fields(cfg))
              if name not in explicit and name not in run_control and name in saved}
    return dataclasses.replace(cfg, **merged)
