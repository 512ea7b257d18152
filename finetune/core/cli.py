"""Command-line flags from config dataclasses: one flag per field, one --help group per dataclass.

A group's docstring is its title; the docstring under each field is the flag's --help text. A flag is the
field's name with dashes (`max_steps` -> `--max-steps`) unless the field's metadata gives `flag`; the rest
of the metadata (choices, nargs, action, metavar, const) goes to argparse as it is.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect

from .errors import ArgumentParser, UserError


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (Python keeps none at run time, so read the source)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
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


def build_arg_parser(groups, description: str, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per field of the `groups` dataclasses, one --help group each. With suppress_defaults, only
    flags given on the command line appear in the parsed namespace (how a resume tells what was given)."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    for group_cls in groups:
        group = parser.add_argument_group(inspect.getdoc(group_cls))
        docs = field_docs(group_cls)
        for f in own_fields(group_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            options = {k: v for k, v in f.metadata.items() if k != "flag"}
            spec = {"help": docs[f.name].replace("%", "%%"), "dest": f.name,
                    "default": argparse.SUPPRESS if suppress_defaults else default}
            if f.type == "bool":
                spec["action"] = "store_true"
            elif "choices" not in options and options.get("action", StoreOnce) is StoreOnce:
                spec["type"] = int if "int" in f.type else float if "float" in f.type else str
            group.add_argument(flag_of(f), **{**spec, **options})
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
