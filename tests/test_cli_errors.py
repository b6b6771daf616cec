"""One error path for the four commands (issue #17): a user mistake prints one ``error: ...`` line and exits 2.

Every package's ``main`` runs through :func:`mmr_core.cli.run_guarded` (the three on ``CommandLine`` through
its ``main``, ``mmr-llava`` directly); a test per package CLI gives it a missing file and a bad setting, and
checks that the shared helper was the one that answered. Our own bugs keep their traceback.
"""

from __future__ import annotations

import importlib

import pytest

import mmr_core.cli as core_cli
from mmr_core.data import TooManySkipsError
from mmr_core.io import RecordError

PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")


@pytest.fixture
def guarded(monkeypatch) -> list[int]:
    """Statuses returned by ``mmr_core.cli.run_guarded`` during the test (a spy around the real helper)."""
    statuses: list[int] = []
    real = core_cli.run_guarded

    def spy(body, user_errors=()):
        status = real(body, user_errors)
        statuses.append(status)
        return status

    monkeypatch.setattr(core_cli, "run_guarded", spy)
    return statuses


def _run(package: str, argv: list[str], capsys) -> tuple[int, str]:
    main = importlib.import_module(f"mmr_{package}.cli").main
    status = main(argv)
    return status, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    """The ``error:`` line of stderr (commands may print progress first), checked to be the only one."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_imagebind_cli_user_mistakes(tmp_path, capsys, guarded):
    status, err = _run("imagebind", ["embed", "--checkpoint", str(tmp_path / "none.pth"), "--modality", "vision",
                                     str(tmp_path / "x.jpg")], capsys)
    assert status == 2 and _one_error_line(err).startswith(f"error: checkpoint {tmp_path / 'none.pth'}: not a file")
    status, err = _run("imagebind", ["train", "lr=abc"], capsys)
    assert status == 2 and _one_error_line(err).startswith("error: unknown config key 'lr'")
    assert guarded == [2, 2]


def test_medvlm_cli_user_mistakes(tmp_path, capsys, guarded):
    status, err = _run("medvlm", ["eval", f"model={tmp_path / 'none'}", f"annotations={tmp_path / 'a.json'}",
                                  f"images={tmp_path}"], capsys)
    assert status == 2
    assert _one_error_line(err) == f"error: {tmp_path / 'none'}: neither a saved-model folder nor a hub id of the " \
                                   "form org/name"
    status, err = _run("medvlm", ["train", "max_steps=abc"], capsys)
    assert (status, _one_error_line(err)) == (2, "error: 'max_steps' expects int, got 'abc' (str)")
    assert guarded == [2, 2]


def test_mmcot_cli_user_mistakes(tmp_path, capsys, guarded):
    status, err = _run("mmcot", ["train", "lr=abc"], capsys)
    assert (status, _one_error_line(err)) == (2, "error: 'lr' expects float, got 'abc' (str)")
    status, err = _run("mmcot", ["eval", "data_root=x"], capsys)
    assert status == 2 and _one_error_line(err).startswith("error: unknown config key 'data_root'")
    assert guarded == [2, 2]


def test_llava_cli_user_mistakes(tmp_path, capsys, guarded):
    status, err = _run("llava", ["chat", "--model", str(tmp_path / "none"), "--prompt", "hi"], capsys)
    assert (status, _one_error_line(err)) == (
        2, f"error: {tmp_path / 'none'}: neither a saved-model folder nor a hub id of the form org/name")
    questions = tmp_path / "q.jsonl"
    latin1 = b'{"question_id": 1, "text": "caf\xe9"}\n'
    questions.write_bytes(latin1)
    status, err = _run("llava", ["infer", "--model", "m", "--questions", str(questions),
                                 "--answers", str(tmp_path / "a.jsonl")], capsys)
    assert (status, _one_error_line(err)) == (
        2, f"error: {questions}:line 1: encoding: byte 0xe9 at byte offset {latin1.index(0xE9)} is not valid UTF-8, "
           "expected UTF-8 text (a byte-order mark is allowed)")
    # eval-sqa: the problems and split files are read and checked before any model is loaded ("m" is none).
    problems, splits = tmp_path / "problems.json", tmp_path / "pid_splits.json"
    problems.write_text('{"1": {"question": "q"}, "2": {"question": "q"}')
    status, err = _run("llava", ["eval-sqa", "--model", "m", "--problems", str(problems), "--image-folder", "."],
                       capsys)
    assert (status, _one_error_line(err)) == (
        2, f"error: {problems}:line 1: json: Expecting ',' delimiter (column 48), expected a valid JSON document")
    problems.write_text('{"1": {"question": "q"}, "2": {"question": "q"}}')
    splits.write_text('{"train": ["1"], "val": ["2", "7"]}')
    sqa = ["eval-sqa", "--model", "m", "--problems", str(problems), "--image-folder", ".", "--split-file", str(splits)]
    status, err = _run("llava", [*sqa, "--split", "test"], capsys)
    assert (status, _one_error_line(err)) == (
        2, f"error: {splits}:document: test: no such split, expected one of ['train', 'val'] (ScienceQA's "
           "pid_splits.json)")
    status, err = _run("llava", [*sqa, "--split", "val"], capsys)
    assert (status, _one_error_line(err)) == (
        2, f"error: {splits}:val: ids: 1 ids not in {problems} (first: ['7']), expected the split and the "
           "problems of one release")
    assert guarded == [2, 2, 2, 2, 2]


# A function each command's handler calls after its arguments are read, replaced by one that fails as a bug would.
BUG_SITES = {
    "imagebind": ("mmr_imagebind.cli", "load_imagebind",
                  ["embed", "--checkpoint", "c.pth", "--modality", "text", "hello"]),
    "medvlm": ("mmr_medvlm.predict", "evaluate_saved_model", ["eval", "model=m", "annotations=a.json", "images=."]),
    "mmcot": ("mmr_mmcot.train", "run", ["train"]),
    "llava": ("mmr_llava.inference", "read_questions", ["infer", "--model", "m", "--questions", "q.jsonl",
                                                         "--answers", "a.jsonl"]),
}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_bug_keeps_its_traceback(package, tmp_path, monkeypatch, guarded):
    """A ``RuntimeError`` from inside a command is no user mistake: it propagates through the shared helper."""
    module_name, attribute, argv = BUG_SITES[package]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pth").write_bytes(b"")  # a checkpoint that exists (never read: the loader is the bug)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(importlib.import_module(module_name), attribute, broken)
    main = importlib.import_module(f"mmr_{package}.cli").main
    with pytest.raises(RuntimeError, match="a bug of ours"):
        main(argv)
    assert guarded == []  # the helper re-raised instead of returning a status


def test_run_guarded_messages(capsys):
    def raise_(exc: BaseException):
        def body():
            raise exc
        return body

    # a KeyError raised with a sentence shows the sentence, not its quoted repr
    assert core_cli.run_guarded(raise_(KeyError("ckpt.pth: checkpoint does not match")), (KeyError,)) == 2
    assert capsys.readouterr().err == "error: ckpt.pth: checkpoint does not match\n"
    assert core_cli.run_guarded(raise_(TooManySkipsError("3 of 20 records skipped"))) == 2
    assert capsys.readouterr().err == "error: 3 of 20 records skipped\n"
    err = RecordError("d.json", "id 7", "conversations", "missing", "expected a list of turns")
    assert core_cli.run_guarded(raise_(err)) == 2
    assert capsys.readouterr().err == "error: d.json:id 7: conversations: missing, expected a list of turns\n"
    with pytest.raises(KeyError):  # not declared a user error: a bug
        core_cli.run_guarded(raise_(KeyError("x")))
    assert core_cli.run_guarded(lambda: None) == 0 and core_cli.run_guarded(lambda: 3) == 3
