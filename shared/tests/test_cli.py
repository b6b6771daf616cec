"""Console-command helpers: --help generated from config dataclasses, precedence, one error path."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmr_core.cli import CommandLine, attribute_docs, config_fields, type_name, undocumented_fields
from mmr_core.config import ConfigError


@dataclass
class Optim:
    """Optimiser settings.

    Attributes:
        lr (float): Peak learning rate; 100% of it is reached after warm-up.
        schedule: Decay after warm-up.
    """

    lr: float = 2e-5
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Recipe:
    """A training recipe.

    Attributes:
        data: ScienceQA-format folder with
            problems.json and pid_splits.json.
        epochs: Passes over the training split.
        output: Where checkpoints go (None: no saving).
        tags: Labels for the run.
        optim: Optimiser section.

    Raises:
        ConfigError: never mentioned in help.
    """

    data: Path
    epochs: int = 2
    output: Path | None = None
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")


def test_attribute_docs_join_continuations_and_stop_at_the_next_section() -> None:
    docs = attribute_docs(Recipe)
    assert docs["data"] == "ScienceQA-format folder with problems.json and pid_splits.json."
    assert docs["output"] == "Where checkpoints go (None: no saving)."
    assert "ConfigError" not in docs and len(docs) == 5
    assert attribute_docs(Optim)["lr"].startswith("Peak learning rate")


@dataclass
class LongRecipe(Recipe):
    """A recipe with more fields (its docstring lists only its own).

    Attributes:
        epochs: Passes, redefined here.
        warmup: Warm-up steps.
    """

    warmup: int = 0


@dataclass
class Undocumented(Recipe):
    pass


def test_attribute_docs_read_base_classes_and_the_subclass_wins() -> None:
    """A field documented once in a shared base keeps its meaning in every subclass (MM-CoT's train and eval
    settings share one data section this way); a subclass's own line replaces the base's."""
    docs = attribute_docs(LongRecipe)
    assert docs["data"] == "ScienceQA-format folder with problems.json and pid_splits.json."
    assert docs["epochs"] == "Passes, redefined here." and docs["warmup"] == "Warm-up steps."
    assert len(docs) == 6 and undocumented_fields(LongRecipe) == []
    # A subclass without a docstring: inspect.getdoc would hand back the base's text; the base's
    # meanings still apply, read once.
    assert attribute_docs(Undocumented) == attribute_docs(Recipe)


def test_fields_flatten_nested_sections_with_types_and_defaults() -> None:
    fields = {doc.name: doc for doc in config_fields(Recipe)}
    assert list(fields) == ["data", "epochs", "output", "tags", "optim.lr", "optim.schedule"]
    assert (fields["data"].type, fields["data"].default) == ("Path", "required")
    assert (fields["output"].type, fields["output"].default) == ("Path | None", "None")
    assert (fields["optim.lr"].type, fields["optim.lr"].default) == ("float", "2e-05")
    assert fields["optim.schedule"].type == "{cosine,constant}"
    assert fields["optim.schedule"].meaning == "Decay after warm-up."
    assert undocumented_fields(Recipe) == []


def _cli(calls: list[argparse.Namespace]) -> CommandLine:
    cli = CommandLine("mmr-demo", "A demo command.", user_errors=(LookupError,))

    def train(args: argparse.Namespace) -> int:
        calls.append(args)
        if args.settings.tags == ["lookup"]:
            raise LookupError("no such split 'dev'")
        if args.settings.tags == ["bug"]:
            raise RuntimeError("a bug")
        return 0

    cli.command("train", train, "train a model", config=Recipe)
    return cli


def test_help_lists_every_field_with_type_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli([]).main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's wrapping
    for doc in config_fields(Recipe):
        assert f"--{doc.name}" in text
        assert f"{doc.meaning} (type: {doc.type}, default: {doc.default})" in text
    assert "100% of it" in text  # a literal % survives argparse's formatting


def test_settings_precedence_file_then_words_then_options(tmp_path: Path) -> None:
    calls: list[argparse.Namespace] = []
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: /from/file\nepochs: 5\noptim:\n  lr: 0.1\n")
    status = _cli(calls).main(
        ["train", "--config", str(yaml_file), "epochs=7", "optim.lr=3e-4", "--optim.lr", "1e-3", "--tags", "[a, b]"]
    )
    assert status == 0
    settings = calls[0].settings
    assert settings.data == Path("/from/file") and settings.epochs == 7
    assert settings.optim.lr == 1e-3 and settings.tags == ["a", "b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "data=x", "epoch=3"], "error: unknown config key 'epoch'. Did you mean epochs?"),
        (["train", "data=x", "--epochs", "two"], "error: 'epochs' expects int, got 'two'"),
        (["train", "data=x", "epochs=0"], "error: epochs must be at least 1, got 0"),
        (["train", "--config", "/no/such.yaml"], "error: config file not found: /no/such.yaml"),
        (["train", "data=x", "tags=[lookup]"], "error: no such split 'dev'"),
    ],
)
def test_user_mistakes_print_one_error_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli([]).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and err.count("\n") == 1


def test_a_missing_required_field_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli([]).main(["train"]) == 2
    assert capsys.readouterr().err == "error: missing required setting(s) data of Recipe (give data=... or --data)\n"


def test_bugs_keep_their_traceback() -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        _cli([]).main(["train", "data=x", "tags=[bug]"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors exit 2 too
        _cli([]).main(["fly"])
    assert exit_info.value.code == 2
    assert issubclass(ConfigError, ValueError)


def test_type_names_read_as_written() -> None:
    assert type_name(tuple[float, ...]) == "tuple[float, ...]"
    assert type_name(int | None) == "int | None"
    assert type_name(list[str]) == "list[str]"
    assert type_name(Literal["a", "b"]) == "{a,b}"
