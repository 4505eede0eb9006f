"""The ``edgevlm`` command line.

One sub-command = one typed function with a Google-style ``Args:`` docstring. Command modules live beside this
file and export ``COMMANDS = {"name": function}``; they are discovered automatically, so adding a verb never
touches this file. Command modules import nothing heavy at module level (torch stays out of ``edgevlm run``).

Parameters become ``--kebab-case`` options; a parameter without a default is required; ``bool`` becomes a flag
(``--random-init`` / ``--no-random-init``); ``list[...]`` takes several values. ``EdgeVLMError`` is printed as
``error: ...`` with exit code 2 and no traceback (``EDGEVLM_TRACEBACK=1`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import inspect as _pyinspect  # aliased: the `inspect` command module would shadow the name
import logging
import os
import pkgutil
import sys
import types
import typing
from typing import Any, Callable

from edgevlm.errors import EdgeVLMError

__all__ = ["main", "build_parser"]


def _doc_parts(fn: Callable) -> tuple[str, str, dict[str, str]]:
    """(summary, long description, {param: help}) from a Google-style docstring."""
    doc = _pyinspect.getdoc(fn) or ""
    lines = doc.splitlines()
    summary = lines[0] if lines else ""
    body: list[str] = []
    params: dict[str, str] = {}
    current = None
    in_args = False
    for line in lines[1:]:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            if stripped and not line.startswith(" "):
                in_args = False
            elif ":" in stripped and line.startswith("    ") and not line.startswith("        "):
                current, _, text = stripped.partition(":")
                current = current.split(" (")[0].strip()
                params[current] = text.strip()
                continue
            elif current and stripped:
                params[current] += " " + stripped
                continue
            elif not stripped:
                continue
        if not in_args:
            body.append(line)
    return summary, "\n".join(body).strip(), params


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_function(sub: argparse.ArgumentParser, fn: Callable) -> None:
    _, _, helps = _doc_parts(fn)
    hints = typing.get_type_hints(fn)
    for name, param in _pyinspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        flag = "--" + name.replace("_", "-")
        required = param.default is _pyinspect.Parameter.empty
        default = None if required else param.default
        help_text = helps.get(name, "").replace("%", "%%")            # argparse formats help with %
        if not required and default not in (None, False, [], ()):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text}
        if tp is bool:
            sub.add_argument(flag, action=argparse.BooleanOptionalAction, default=bool(default), **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs.update(nargs="+", type=inner)
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        if required and name in getattr(fn, "__positional__", ()):
            kwargs.pop("dest")
            sub.add_argument(name, **kwargs)
            continue
        sub.add_argument(flag, required=required, default=default, **kwargs)


def _discover() -> dict[str, Callable]:
    commands: dict[str, Callable] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        commands.update(getattr(module, "COMMANDS", {}))
    return commands


def positional(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: make the named required parameters positional (``edgevlm run BUNDLE``)."""
    def wrap(fn: Callable) -> Callable:
        fn.__positional__ = names  # type: ignore[attr-defined]
        return fn
    return wrap


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    from edgevlm import __version__

    commands = _discover()
    parser = argparse.ArgumentParser(
        prog="edgevlm",
        description="Train, quantize, export, run and benchmark compact vision-language models (MobileVLM) "
                    "on Jetson Orin, GPUs and CPUs.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn in commands.items():
        summary, body, _ = _doc_parts(fn)
        sub = subs.add_parser(name, help=summary, description=(summary + ("\n\n" + body if body else "")),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_function(sub, fn)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.command:
        parser.print_help()
        return 0
    fn = commands[args.command]
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    try:
        result = fn(**kwargs)
    except EdgeVLMError as exc:
        if os.environ.get("EDGEVLM_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
