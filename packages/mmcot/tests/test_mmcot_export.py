"""Issue #14: an exported stage carries its tokenizer, so ``mmr-mmcot eval`` needs only the model folders."""

import json

import pytest
import torch

from mmr_mmcot.cli import main
from mmr_mmcot.config import DataConfig, EvalConfig, TrainConfig
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.model import MMCoTConfig, MMCoTModel
from mmr_mmcot.tokenizer import SentencePieceTokenizer, load_tokenizer, save_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqa")
    files = write_release(root / "data", n_train=4, n_test=3, seed=2)
    tok = train_sentencepiece(corpus(json.loads(files.problems.read_text())), root / "tok.model", 160)
    return files, tok


def test_our_tokenizer_round_trips_through_a_folder(release, tmp_path):
    _, tok = release
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.vocab_size == tok.vocab_size
    text = "Which property do these two objects have in common?"
    assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_a_hugging_face_tokenizer_round_trips_through_a_folder(release, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    _, tok = release

    class _Proto:  # what SpmConverter reads from a slow tokenizer: the model file
        vocab_file = tok.model_file

    converted = SpmConverter(_Proto()).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=converted, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    save_tokenizer(hf, tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert not isinstance(loaded, SentencePieceTokenizer)
    assert loaded("a soft scarf")["input_ids"] == hf("a soft scarf")["input_ids"]


def test_eval_reads_the_tokenizer_of_the_stage1_folder_or_says_it_is_missing(release, tmp_path, capsys):
    files, tok = release
    folders = {}
    for name in ("stage1", "stage2"):
        torch.manual_seed(0)
        model = MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=tok.vocab_size, dropout_rate=0.0))
        folders[name] = model.save_pretrained(tmp_path / name)
    argv = ["eval", f"stage1={folders['stage1']}", f"stage2={folders['stage2']}", f"problems={files.problems}",
            f"pid_splits={files.pid_splits}", f"features={files.features}", f"name_map={files.name_map}",
            "source_len=64", "rationale_len=4", "answer_len=4", "similarity_model="]
    # A folder written without its tokenizer (not by mmr-mmcot train): one line naming what to set.
    assert main([*argv, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: eval needs tokenizer=...: {folders['stage1']} holds no tokenizer (spiece.model or "
                   "tokenizer_config.json); models exported by mmr-mmcot train carry theirs\n")
    # With the tokenizer in the folder (as training exports it): the same outputs as naming the file.
    save_tokenizer(tok, folders["stage1"])
    assert main([*argv, f"output_dir={tmp_path / 'b'}"]) == 0
    assert main([*argv, f"tokenizer={tok.model_file}", f"output_dir={tmp_path / 'c'}"]) == 0
    for name in ("rationales.json", "predictions.json", "metrics.json"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "c" / name).read_text()


def test_train_and_eval_share_one_data_config():
    """Issue #15: the data settings are declared once (DataConfig) and both commands take them as they are."""
    import dataclasses

    shared = {f.name: f for f in dataclasses.fields(DataConfig)}
    for config in (TrainConfig, EvalConfig):
        assert issubclass(config, DataConfig)
        own = {f.name: f for f in dataclasses.fields(config)}
        assert all(own[name].default == field.default for name, field in shared.items())
    train_only = {f.name for f in dataclasses.fields(TrainConfig)} - set(shared)
    eval_only = {f.name for f in dataclasses.fields(EvalConfig)} - set(shared)
    assert train_only & eval_only == {"batch_size", "output_dir"}  # same names, each command's own meaning
