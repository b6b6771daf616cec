"""mmr-mmcot: --help from the config dataclasses, save/load convention at real size, eval end to end."""

import dataclasses
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mmr_core.cli import config_fields
from mmr_core.hub import WEIGHTS_INDEX_NAME, PretrainedError
from mmr_mmcot.cli import FeaturesConfig, main
from mmr_mmcot.data import ScienceQA, VisionFeatures
from mmr_mmcot.inference import EvalConfig, answer_question
from mmr_mmcot.metrics import CATEGORIES
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.model import MMCoTConfig, MMCoTModel
from mmr_mmcot.tokenizer import train_sentencepiece
from mmr_mmcot.train import TrainConfig


def _flat(text: str) -> str:
    return " ".join(text.split())  # undo argparse's line wrapping


def test_console_help_lists_every_train_setting():
    # Through the module the console script points at ([project.scripts] mmr-mmcot = mmr_mmcot.cli:main).
    done = subprocess.run(
        [sys.executable, "-m", "mmr_mmcot.cli", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    fields = list(config_fields(TrainConfig))
    assert len(fields) == len(dataclasses.fields(TrainConfig)) == 51
    for doc in fields:
        assert doc.meaning, f"TrainConfig.{doc.name} has no line in the Attributes section"
        assert f"--{doc.name} " in text
        assert _flat(f"{doc.meaning} (type: {doc.type}, default: {doc.default})") in text
    assert "(type: float, default: 8e-05)" in text  # lr


@pytest.mark.parametrize(("command", "config"), [("eval", EvalConfig), ("features", FeaturesConfig)])
def test_help_of_eval_and_features(command, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = _flat(capsys.readouterr().out)
    for doc in config_fields(config):
        assert doc.meaning and _flat(f"{doc.meaning} (type: {doc.type}, default: {doc.default})") in text


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert main(["eval", "stage2=x", "tokenizer=t.model"]) == 2
    assert capsys.readouterr().err == "error: eval needs stage1=... (see mmr-mmcot eval --help)\n"
    assert main(["eval", f"stage1={tmp_path}", "stage2=x", "tokenizer=t.model"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: no config.json")
    assert main(["eval", "--batch_size", "many"]) == 2
    assert "'batch_size' expects int" in capsys.readouterr().err
    assert main(["features", "problems=/no/problems.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "/no/problems.json" in err and "Traceback" not in err


def _state_equal(a: MMCoTModel, b: MMCoTModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    ("size", "vocab_size"),
    [
        ("mini-unifiedqa", 32128),
        # UnifiedQA-T5-base as released: 223 M parameters, 0.89 GB of float32; ~45 s on a loaded 2-core machine.
        pytest.param("unifiedqa-t5-base", 32128, marks=pytest.mark.slow),
    ],
)
def test_save_load_sharded_and_from_the_hub_cache_offline(size, vocab_size, tmp_path, monkeypatch):
    """Tied T5 v1.0 embeddings with the real vocabulary: sharded into 4+ files, read back bitwise from a hub id."""
    torch.manual_seed(0)
    model = MMCoTModel(MMCoTConfig.from_name(size, vocab_size=vocab_size, dropout_rate=0.0)).eval()
    assert model.t5.lm_head.weight is model.t5.shared.weight
    total = (
        sum(t.numel() * t.element_size() for t in model.state_dict().values()) - 3 * model.t5.shared.weight.numel() * 4
    )
    shard_limit = total // 4
    start = time.perf_counter()
    folder = model.save_pretrained(tmp_path / "saved", max_shard_size=shard_limit)
    index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
    # The shared embedding is stored once (the encoder/decoder copies and the tied head come back tied).
    assert "t5.shared.weight" in index["weight_map"] and "t5.lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == total
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # mini: the embedding alone (over the limit) and the rest; base: 5 files
    for shard in shards:
        # Within the limit plus the shard's JSON header, unless the shard is the embedding alone (larger
        # than the limit on its own, it gets a file of its own, as transformers does).
        own = [k for k, f in index["weight_map"].items() if f == shard]
        assert (folder / shard).stat().st_size <= shard_limit + 64_000 or own == ["t5.shared.weight"]

    # A hub id resolved offline from a cache folder laid out as huggingface_hub writes it.
    revision = "a" * 40
    repo = tmp_path / "hub" / "models--mmr-test--mmcot"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = MMCoTModel.from_pretrained("mmr-test/mmcot", cache_dir=tmp_path / "hub")
    print(f"save + load of {size}: {time.perf_counter() - start:.1f} s")
    assert loaded.config == model.config
    assert loaded.t5.lm_head.weight is loaded.t5.shared.weight
    assert loaded.t5.encoder.embed_tokens.weight is loaded.t5.shared.weight
    _state_equal(model, loaded)
    ids = torch.randint(0, vocab_size, (1, 12))
    images = torch.randn(1, model.config.patch_num, model.config.patch_dim)
    mask = torch.ones_like(ids)
    assert torch.equal(
        model.generate(ids, mask, images, max_new_tokens=4), loaded.generate(ids, mask, images, max_new_tokens=4)
    )
    with pytest.raises(PretrainedError, match="hub id 'mmr-test/other'"):
        MMCoTModel.from_pretrained("mmr-test/other", cache_dir=tmp_path / "hub")


def test_untied_flan_layout_round_trip_and_legacy_folder(tmp_path):
    torch.manual_seed(1)
    model = MMCoTModel(MMCoTConfig.from_name("tiny")).eval()  # v1.1 layout: lm_head is its own weight
    assert not model.config.tie_word_embeddings
    loaded = MMCoTModel.load(model.save(tmp_path / "new"))
    assert loaded.t5.lm_head.weight is not loaded.t5.shared.weight
    _state_equal(model, loaded)
    # A folder written before the convention (mmcot_config.json) still loads.
    from safetensors.torch import save_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "mmcot_config.json").write_text(json.dumps(model.config.__dict__))
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(legacy / "model.safetensors"))
    _state_equal(model, MMCoTModel.load(legacy))


@pytest.fixture(scope="module")
def saved_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    files = write_release(root / "data", n_train=8, n_test=4, seed=5)
    tok = train_sentencepiece(corpus(json.loads(files.problems.read_text())), root / "tok.model", 160)
    stages = {}
    for seed, name in ((2, "stage1"), (3, "stage2")):
        torch.manual_seed(seed)
        model = MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=tok.vocab_size, dropout_rate=0.0))
        stages[name] = model.save_pretrained(root / name)
    return files, tok, stages


def test_eval_runs_both_stages_from_saved_models(saved_stages, tmp_path, capsys):
    files, tok, stages = saved_stages
    out = tmp_path / "out"
    argv = [
        "eval",
        f"stage1={stages['stage1']}",
        f"stage2={stages['stage2']}",
        f"tokenizer={tok.model_file}",
        f"problems={files.problems}",
        f"pid_splits={files.pid_splits}",
        f"captions={files.captions}",
        f"features={files.features}",
        f"name_map={files.name_map}",
        "source_len=96",
        "rationale_len=12",
        "answer_len=8",
        "batch_size=1",
        "similarity_model=",
        f"output_dir={out}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| Method | " + " | ".join(CATEGORIES) + " |")

    def no_nan(constant):
        raise AssertionError(f"metrics.json holds {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    predictions = json.loads((out / "predictions.json").read_text())
    rationales = json.loads((out / "rationales.json").read_text())
    data = ScienceQA.load(files.problems, files.pid_splits, files.captions)
    test_pids = data.split("test")
    assert sorted(predictions) == sorted(rationales) == sorted(test_pids) and metrics["problems"] == 4
    correct = [p["correct"] for p in predictions.values()]
    assert metrics["answer"]["Avg"] == pytest.approx(100 * sum(correct) / len(correct))
    assert (out / "metrics.md").read_text().splitlines()[0] == printed.splitlines()[0]

    # Each problem's rationale and answer equal the one-problem path (answer_question) on the same models.
    stage1, stage2 = MMCoTModel.from_pretrained(stages["stage1"]), MMCoTModel.from_pretrained(stages["stage2"])
    feats = VisionFeatures.load(files.features, files.name_map, patch_num=stage1.config.patch_num)
    for pid in test_pids:
        problem = data.problems[pid]
        image = feats.lookup(pid, problem)[0] if problem.get("image") else None
        rationale, answer = answer_question(
            stage1, stage2, tok, problem, image, use_caption=True, source_len=96, rationale_len=12, answer_len=8
        )
        assert (rationales[pid], predictions[pid]["output"]) == (rationale, answer), pid
