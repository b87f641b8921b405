"""The typer options of the declared fields (mlpfuse/option_fields.py): one flag name and one help text wherever they appear.

:func:`command` builds a command's options from the declarations: the command function lists only its own
arguments and options, plus ``opts``, which receives the declared ones (``opts.device``, ``opts.seed``...);
``COMMON`` is added to every command. ``recipe=True`` (``fuse``) makes every declared option default to None
(unset), so that :func:`merge_declared` can tell a flag from a recipe value from a default. ``tests/test_cli_flags.py``
walks every command and checks that a flag has one name and one help text everywhere.
Import-light on purpose (typer, the option and method declarations only): ``mlpfuse --help`` must not pull torch or transformers.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import typer

from mlpfuse.methods.catalog import methods_help
from mlpfuse.option_fields import COMMON, Field, Group

# Every built-in method with its help line, read from the declarations (mlpfuse/methods/catalog.py, no torch).
METHODS_HELP = methods_help()

# --- options generated from the declarations ----------------------------------------------------------------

class Options(SimpleNamespace):
    """The values of a command's declared options for one run: ``opts.device``, ``opts.seed``..."""


def typer_option(field: Field, recipe: bool = False):
    """The typer option of ``field``.

    ``recipe``: the option defaults to None (unset: a recipe value or the declared default applies, see
    :func:`merge_declared`), ``--help`` shows the declared default, and a switch gets its ``--no-`` form
    so that a flag can override the recipe.
    """
    help_text = field.help.replace("{methods}", METHODS_HELP)
    flags = field.flags
    if recipe:
        shown = field.shown
        if field.type is bool:
            flags = tuple(f"{flag}/--no-{flag[2:]}" if flag.startswith("--") and "/" not in flag else flag
                          for flag in flags)
            shown = shown or ("" if field.default else "no-") + field.flags[-1][2:]
        elif shown is None and field.default is not None:
            shown = str(field.default)
        return typer.Option(None, *flags, help=help_text, show_default=shown if shown is not None else True)
    default = ... if field.required else field.default
    return typer.Option(default, *flags, help=help_text, show_default=field.shown if field.shown is not None else True)


def command(*declared: Field | Group, recipe: bool = False):
    """Decorator of a command function: appends the typer options of ``declared`` (fields, or whole groups)
    and of ``COMMON`` to its signature, and runs it under :func:`mlpfuse.cli.common.handle_errors`.

    The function lists its own arguments and options as usual, plus a parameter ``opts`` that receives an
    :class:`Options` with the declared values (each passed through its field's ``parse``). ``recipe``: see
    :func:`typer_option`.
    """
    fields: list[Field] = []
    for item in (*declared, COMMON):
        fields.extend(item if isinstance(item, Group) else (item,))
    common = set(COMMON.names())  # never recipe fields
    names = [f.name for f in fields]
    assert len(set(names)) == len(names), f"a declared option given twice: {names}"

    def decorate(fn):
        from mlpfuse.cli.common import handle_errors  # common imports this module

        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != "opts"]
        clash = {p.name for p in own} & set(names)
        assert not clash, f"{fn.__name__} declares {clash} itself and through option_fields"
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option(f, recipe and f.name not in common),
                                   annotation=f.type) for f in fields if f.flags]
        given = {p.name for p in added}

        @functools.wraps(fn)
        def run(*args, **kwargs):
            values = {f.name: kwargs.pop(f.name, None) if f.name in given else f.default for f in fields}
            values = {name: (field.parse(value) if field.parse and value is not None else value)
                      for (name, value), field in zip(values.items(), fields)}
            return fn(*args, **kwargs, opts=Options(**values))

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added  # typer passes keywords
        run.__signature__ = signature.replace(parameters=parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.declared = tuple(fields)
        return handle_errors(run)

    return decorate


def merge_declared(opts: Options, recipe: dict, fields) -> dict:
    """Each field's value: its flag wins over the recipe, the recipe over the declared default."""
    merged = {}
    for field in fields:
        value = getattr(opts, field.name, None)
        merged[field.name] = value if value is not None else recipe.get(field.name, field.default)
    return merged
