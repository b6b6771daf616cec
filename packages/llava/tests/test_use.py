"""Chat CLI (streaming), batched generation and ScienceQA scoring."""

import json
import os
from pathlib import Path

import pytest
import torch

from mmr_llava import scienceqa as sqa
from mmr_llava.cli import main as cli_main
from mmr_llava.inference import answer_batch, load_for_inference
from mmr_llava.scenes import write_dataset
from mmr_llava.train import TrainConfig, train

PROBLEMS = {
    "1": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "",
          "image": None, "subject": "natural science", "grade": "grade3"},
    "2": {"question": "Which word is a noun?", "choices": ["run", "dog", "blue"], "answer": 1,
          "hint": "Pick one.", "image": "image.png", "subject": "language science", "grade": "grade8"},
    "3": {"question": "Which city is a capital?", "choices": ["Paris", "Lyon"], "answer": 0, "hint": "",
          "image": "image.png", "subject": "social science", "grade": "grade6"},
}


def test_sqa_prompt_parse_and_score():
    q = sqa.build_question(PROBLEMS["2"])
    assert q == ("<image>\nWhich word is a noun?\nContext: Pick one.\nOptions: (A) run (B) dog (C) blue\n"
                 "Answer with the option's letter from the given choices directly.")
    assert "Context: N/A" in sqa.build_question(PROBLEMS["1"])
    assert [sqa.parse_answer(t, 3) for t in ["B", "(C)", "A.", "The answer is B.", "dog", "D"]] == [1, 2, 0, 1, -1, -1]
    s = sqa.score(PROBLEMS, {"1": 1, "2": 0, "3": 0})
    assert s["Avg"] == pytest.approx(200 / 3) and s["NAT"] == 100 and s["LAN"] == 0 and s["SOC"] == 100
    assert s["NO"] == 100 and s["IMG"] == 50 and s["TXT"] == 0 and s["G1-6"] == 100 and s["G7-12"] == 0
    assert "| NAT |" in sqa.format_table(s)


def test_sqa_score_is_the_shared_scorer_on_the_golden_table():
    """One scorer for the repository: the golden table of mmr-core's tests, through ``sqa.score``."""
    golden = json.loads((Path(__file__).resolve().parents[3] / "shared" / "tests" / "data"
                         / "scienceqa_golden.json").read_text())
    scores = sqa.score(golden["problems"], golden["predictions"])  # p7 has no prediction: wrong
    # [correct, total] pairs of small integers, divided once in float64 here and in the scorer: equal.
    assert scores == {c: 100.0 * hit / total for c, (hit, total) in golden["expected"].items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ["MMR_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("use")
    paths = write_dataset(root / "data", n_scenes=6, seed=3)
    train(TrainConfig(data=str(paths["instruct"]), image_folder=str(root / "data"), output_dir=str(root / "run"),
                      micro_batch_size=4, max_steps=1, tokenizer_vocab=200))
    return root


def test_batched_answers_match_single(trained):
    model, tok = load_for_inference(trained / "run" / "model")
    img = str(trained / "data" / "images" / "3_00000.png")
    convs = [[{"from": "human", "value": "<image>\nHow many shapes are in the image?"}],
             [{"from": "human", "value": "Is there a red shape in this long question about the picture?"}]]
    batched = answer_batch(model, tok, "v1", convs, [[img], []], max_new_tokens=6)
    single = [answer_batch(model, tok, "v1", [c], [i], max_new_tokens=6)[0] for c, i in zip(convs, [[img], []])]
    assert batched == single and all(isinstance(b, str) for b in batched)


def test_chat_cli_streams(trained, capsys):
    img = str(trained / "data" / "images" / "3_00001.png")
    cli_main(["chat", "--model", str(trained / "run" / "model"), "--image", img, "--prompt", "What color?",
              "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert out.endswith("\n")


def test_eval_sqa_cli(trained, tmp_path, capsys):
    from PIL import Image

    for pid in ("2", "3"):
        (tmp_path / "img" / pid).mkdir(parents=True)
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(tmp_path / "img" / pid / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    cli_main(["eval-sqa", "--model", str(trained / "run" / "model"), "--problems", str(tmp_path / "problems.json"),
              "--image-folder", str(tmp_path / "img"), "--batch-size", "2", "--out", str(tmp_path / "a.jsonl")])
    out = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in out
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
