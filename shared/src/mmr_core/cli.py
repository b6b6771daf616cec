"""Console commands built from config dataclasses: real ``--help``, one error path.

Every package's command (``mmr-imagebind``, ``mmr-medvlm``, ``mmr-mmcot``, ``mmr-llava``) is an
argparse program with subcommands. A subcommand that runs from a config dataclass gets, for every field
(nested sections as dotted names), an option ``--section.field VALUE`` whose help line gives the
field's meaning (from the dataclass docstring's Google-style ``Attributes:`` section), its type and
its default, after litgpt's and torchtune's commands. Settings are read in this order, later winning:
the dataclass defaults (or a named preset), ``--config FILE.yaml``, ``key=value`` overrides given as
positional words, ``--key value`` options. Values are YAML scalars (``2e-5``, ``[a, b]``, ``null``).

User mistakes (a :class:`~mmr_core.config.ConfigError`, a missing file, a malformed record, a bad
image, an untrusted checkpoint, too many skipped records, or whatever the package adds to ``user_errors``)
print one line ``error: ...`` on stderr and exit 2; anything else is a bug and keeps its traceback. Every
package's ``main`` goes through :func:`run_guarded` (directly, or through :meth:`CommandLine.main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmr_core.config import ConfigError, load_config

_FIELD_DEST_PREFIX = "config_field:"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The core's user-mistake exceptions (imported lazily: the io package pulls in PIL)."""
    from mmr_core.io.images import ImageReadError
    from mmr_core.io.records import RecordError
    from mmr_core.io.safe_load import UntrustedCheckpointError
    from mmr_core.io.skips import TooManySkipsError

    return (
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        RecordError,
        ImageReadError,
        UntrustedCheckpointError,
        TooManySkipsError,
    )


# ------------------------------------------------------------------------------------- field documents


def attribute_docs(cls: type) -> dict[str, str]:
    """Field meanings from the ``Attributes:`` sections of ``cls`` and its base classes, each in one line.

    Google style: ``name: text`` lines indented under ``Attributes:``, continuation lines indented
    further. The section ends at the next unindented line or the next section header. A field documented
    by a base class (a shared settings dataclass) keeps that meaning in every subclass unless the subclass
    documents it again.
    """
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            meanings.update(_own_attribute_docs(klass))
    return meanings


def _own_attribute_docs(cls: type) -> dict[str, str]:
    """The meanings of one class's own docstring (not inherited: ``inspect.getdoc`` would return a base's)."""
    doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ else ""
    meanings: dict[str, str] = {}
    in_section = False
    section_indent = None
    current: str | None = None
    item_indent = 0
    for line in doc.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not in_section:
            in_section = stripped == "Attributes:"
            section_indent = indent
            continue
        if not stripped:
            continue
        if indent <= (section_indent or 0):
            break
        match = re.match(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", stripped)
        if match and (current is None or indent <= item_indent):
            current, item_indent = match.group(1), indent
            meanings[current] = match.group(2)
        elif current is not None:
            meanings[current] = f"{meanings[current]} {stripped}".strip()
    return meanings


def type_name(tp: Any) -> str:
    """A short readable name of a field annotation: ``int``, ``float | None``, ``list[str]``, ``{a,b}``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    if tp is Ellipsis:  # tuple[float, ...]
        return "..."
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


@dataclass(frozen=True)
class FieldDoc:
    """One settable field of a config, as ``--help`` shows it.

    Attributes:
        name: Dotted name (``optim.lr``) used by ``--optim.lr`` and ``optim.lr=...``.
        type: Readable type name.
        default: The default, as shown (``required`` when the field has none).
        meaning: The field's line from its dataclass's ``Attributes:`` section ("" if undocumented).
    """

    name: str
    type: str
    default: str
    meaning: str


def _default_text(field: dataclasses.Field, instance: Any | None) -> tuple[Any, bool]:
    if instance is not None:
        return getattr(instance, field.name), True
    if field.default is not dataclasses.MISSING:
        return field.default, True
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory(), True
    return None, False


def config_fields(cls: type, defaults: Any | None = None, prefix: str = "") -> Iterator[FieldDoc]:
    """Every settable field of a config dataclass, nested dataclasses flattened to dotted names.

    Args:
        cls: The config dataclass.
        defaults: An instance whose values are shown as defaults (a preset); the class's own otherwise.
        prefix: Dotted prefix of a nested section (used in recursion).
    """
    hints = typing.get_type_hints(cls)
    meanings = attribute_docs(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        value, has_default = _default_text(field, defaults)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from config_fields(tp, value if has_default else None, f"{prefix}{field.name}.")
            continue
        if isinstance(value, Path):
            value = str(value)
        shown = repr(value) if isinstance(value, str) else str(value)
        yield FieldDoc(
            f"{prefix}{field.name}", type_name(tp), shown if has_default else "required", meanings.get(field.name, "")
        )


def undocumented_fields(cls: type) -> list[str]:
    """Dotted names of fields without a line in their dataclass's ``Attributes:`` section."""
    return [doc.name for doc in config_fields(cls) if not doc.meaning]


def help_line(doc: FieldDoc) -> str:
    """``meaning (type: T, default: D)``; argparse wraps it. ``%`` is escaped for argparse."""
    text = f"{doc.meaning} (type: {doc.type}, default: {doc.default})".strip()
    return text.replace("%", "%%")


# ------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's own line breaks and never breaks help lines at hyphens (warm-up, file-names)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, defaults: Any | None = None, *, config_file: bool = True
) -> None:
    """Give ``parser`` an option per config field, ``--config FILE`` and positional ``key=value`` words.

    Args:
        parser: The (sub)command's parser.
        cls: The config dataclass.
        defaults: Preset whose values ``--help`` shows as defaults.
        config_file: Also add ``--config FILE`` (a YAML file of the fields).
    """
    parser.set_defaults(_config_class=cls)
    if config_file:
        parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="YAML file of the settings below")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="settings as key=value words (e.g. optim.lr=2e-5); same keys as the options below",
    )
    group = parser.add_argument_group(f"settings ({cls.__name__}; --key value or key=value, YAML values)")
    for doc in config_fields(cls, defaults):
        flags = [f"--{doc.name}"]
        if "_" in doc.name:
            flags.append(f"--{doc.name.replace('_', '-')}")
        group.add_argument(
            *flags,
            dest=_FIELD_DEST_PREFIX + doc.name,
            default=None,
            metavar=doc.type.replace(" ", ""),
            help=help_line(doc),
        )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` words of a parsed command line: positional ones first, then the options."""
    words = list(getattr(args, "overrides", []) or [])
    for key, value in vars(args).items():
        if key.startswith(_FIELD_DEST_PREFIX) and value is not None:
            words.append(f"{key.removeprefix(_FIELD_DEST_PREFIX)}={value}")
    return words


def config_from_args(args: argparse.Namespace, cls: type | None = None, base: Any | None = None) -> Any:
    """Build the config of a parsed command: defaults (or ``base``), ``--config`` file, overrides.

    Raises:
        ConfigError: On unknown keys, bad values, a missing file, or the config's own validation.
    """
    cls = cls or args._config_class
    try:
        return load_config(cls, getattr(args, "config", None), config_overrides(args), base=base)
    except ConfigError:
        raise
    except TypeError as exc:  # a field without a default was not given
        missing = re.findall(r"'(\w+)'", str(exc)) if "required" in str(exc) else []
        if not missing:
            raise
        shown = ", ".join(missing)
        raise ConfigError(
            f"missing required setting(s) {shown} of {cls.__name__} (give {missing[0]}=... or --{missing[0]})"
        ) from exc
    except ValueError as exc:  # the dataclass's own __post_init__ checks
        raise ConfigError(str(exc)) from exc


# --------------------------------------------------------------------------------------------- running


class CommandLine:
    """An argparse program with subcommands and one error path.

    Args:
        prog: The console script's name.
        description: One paragraph shown by ``prog --help``.
        user_errors: Package exceptions that mean a user mistake (exit 2 without a traceback).

    Example::

        cli = CommandLine("mmr-mmcot", "Multimodal-CoT: train, evaluate, extract features.")
        train = cli.command("train", run_train, "fine-tune a stage", config=TrainConfig)
        sys.exit(cli.main())
    """

    def __init__(self, prog: str, description: str, *, user_errors: Sequence[type[BaseException]] = ()):
        self.parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
        self.subcommands = self.parser.add_subparsers(dest="command", metavar="COMMAND")
        self.subcommands.required = True
        self.user_errors = tuple(user_errors)

    def command(
        self,
        name: str,
        handler: Callable[[argparse.Namespace], Any],
        help: str,
        *,
        config: type | None = None,
        defaults: Any | None = None,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        """Add a subcommand; with ``config`` its fields become options (see :func:`add_config_arguments`).

        The handler receives the parsed arguments; with ``config`` it finds the built config in
        ``args.settings``. It returns an exit status (``None`` counts as 0).
        """
        parser = self.subcommands.add_parser(
            name, help=help, description=description or help, formatter_class=HelpFormatter
        )
        parser.set_defaults(_handler=handler, _config_defaults=defaults)
        if config is not None:
            add_config_arguments(parser, config, defaults)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv``, run the subcommand; a user mistake prints ``error: ...`` and returns 2."""
        args = self.parser.parse_args(argv)
        return run_guarded(lambda: self._dispatch(args), self.user_errors)

    def _dispatch(self, args: argparse.Namespace) -> int:
        if getattr(args, "_config_class", None) is not None:
            args.settings = config_from_args(args, base=args._config_defaults)
        status = args._handler(args)
        return int(status or 0)


def run_guarded(body: Callable[[], Any], user_errors: Sequence[type[BaseException]] = ()) -> int:
    """Run ``body``; a user mistake prints ``error: <message>`` to stderr and returns 2.

    User mistakes are the core's (config errors, missing files, malformed records and images, untrusted
    checkpoints, too many skipped records) plus ``user_errors``; other exceptions propagate with their
    traceback. Every package's ``main`` runs through here, so the four commands share one error path.
    """
    try:
        status = body()
    except (*_user_error_types(), *user_errors) as exc:
        message = error_message(exc)
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def error_message(exc: BaseException) -> str:
    """The one line printed after ``error:`` for a user mistake.

    A ``KeyError``'s own text is its key's ``repr`` (quoted); the message it was raised with is shown
    instead. An exception without a message is named by its type.
    """
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
    else:
        message = str(exc)
    return message or type(exc).__name__
