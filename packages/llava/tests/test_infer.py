"""``mmr-llava infer`` (the original's model_vqa format, chunks, resume), generation options through the CLI
and ``answer_batch``, streaming pieces, and loading for inference in another dtype."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmr_llava import checkpoint as ckpt
from mmr_llava.cli import main as cli_main
from mmr_llava.inference import (
    GenerationOptions,
    answer_batch,
    get_chunk,
    load_for_inference,
    model_id_from_path,
    read_questions,
    split_list,
    stream_answer,
)
from mmr_llava.model import build_model
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

TEXTS = ["a red circle and two blue squares", "what color is the shape on the left", "how many shapes are there"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny checkpoint with its tokenizer, saved in shards, and a few images."""
    root = tmp_path_factory.mktemp("infer")
    # Seed 4: a random model whose greedy reply to the first image is 16 characters long (others stop sooner).
    ckpt.save_pretrained(build_model("tiny", seed=4), root / "model", layout="original", max_shard_size="200KB")
    train_tiny_tokenizer(TEXTS, 200).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "images" / name)
    return root


def test_chunks_as_the_original_splits_them():
    assert [len(c) for c in split_list(list(range(10)), 4)] == [3, 3, 3, 1]
    assert [get_chunk(list(range(10)), 4, k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert get_chunk(list(range(5)), 4, 3) == [] and get_chunk([], 3, 1) == []  # the original: IndexError
    with pytest.raises(ValueError, match="chunk_idx 4 is not in 0..3"):
        get_chunk([1], 4, 4)
    assert model_id_from_path("runs/llava-7b/") == "llava-7b"
    assert model_id_from_path("runs/llava-7b/checkpoint-500") == "llava-7b_checkpoint-500"


def _questions(folder):
    rows = [{"question_id": 7, "image": "a.png", "text": "What color is the shape?", "category": "conv"},
            {"question_id": "q2", "image": "sub/b.jpg", "text": "How many shapes are there?"},
            {"question_id": 3, "text": "Describe a red circle."},
            {"question_id": 4, "image": "a.png", "text": "Is it on the left?"},
            {"question_id": 5, "image": "sub/b.jpg", "text": "What is in the picture?"}]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_infer_chunks_resume_and_model_vqa_format(folder, tmp_path, capsys):
    questions, rows = _questions(folder)
    common = ["infer", "--model", str(folder / "model"), "--questions", str(questions), "--image-folder",
              str(folder / "images"), "--max-new-tokens", "5", "--device", "cpu"]
    for k in (0, 1):
        cli_main([*common, "--answers", str(tmp_path / f"answers_{k}.jsonl"), "--num-chunks", "2", "--chunk-idx", str(k),
                  "--batch-size", "2"])
    captured = capsys.readouterr()
    assert "parameters x 4 bytes (float32)" in captured.err  # the memory estimate, before loading
    chunks = [[json.loads(line) for line in (tmp_path / f"answers_{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    # ceil(5 / 2) = 3 questions in the first chunk, 2 in the second, in file order.
    assert [[a["question_id"] for a in c] for c in chunks] == [[7, "q2", 3], [4, 5]]
    model, tok = load_for_inference(folder / "model", device="cpu")
    for answer, row in zip(chunks[0] + chunks[1], rows, strict=True):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == row["text"] and answer["model_id"] == "model" and answer["metadata"] == {}
        # The reply is the chat reply to "<image>\n" + text with the image (batching changes nothing).
        conv = [{"from": "human", "value": ("<image>\n" if "image" in row else "") + row["text"]}]
        images = [str(folder / "images" / row["image"])] if "image" in row else []
        assert answer["text"] == answer_batch(model, tok, "v1", [conv], [images], max_new_tokens=5)[0]
    assert len({a["answer_id"] for a in chunks[0] + chunks[1]}) == 5

    # Resume: a run stopped while writing its third line; the rerun keeps the two whole lines and adds the rest.
    answers = tmp_path / "answers_0.jsonl"
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(lines[0] + lines[1] + lines[2][:10])
    cli_main([*common, "--answers", str(answers), "--num-chunks", "2", "--chunk-idx", "0"])
    assert "1 answered, 2 already there" in capsys.readouterr().out
    again = answers.read_text().splitlines(keepends=True)
    assert again[:2] == lines[:2] and len(again) == 3 and json.loads(again[2])["text"] == chunks[0][2]["text"]
    cli_main([*common, "--answers", str(answers), "--num-chunks", "2", "--chunk-idx", "0"])
    assert "0 answered, 3 already there" in capsys.readouterr().out and answers.read_text() == "".join(again)


def test_bad_question_lines_are_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:line 2: text: missing, expected a string$"):
        read_questions(path)
    path.write_text('{"question_id": 1, "text": "hi"}\nnot json\n')
    with pytest.raises(ValueError, match=r"q.jsonl:line 2: json: Expecting value \(column 1\), expected one JSON"):
        read_questions(path)


def test_streamed_pieces_add_up_to_the_reply(folder):
    """The pieces a stream hands out are the reply, also when a stop string cuts it (text that may begin a stop
    string is held back); beam search and sampling options reach generation."""
    model, tok = load_for_inference(folder / "model", device="cpu")
    image = str(folder / "images" / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}]
    full = answer_batch(model, tok, "v1", [conv], [[image]], max_new_tokens=12)[0]
    assert len(full) >= 8
    stop = full[len(full) // 2: len(full) // 2 + 2]
    for options in (GenerationOptions(max_new_tokens=12), GenerationOptions(max_new_tokens=12, stop=(stop,)),
                    GenerationOptions(max_new_tokens=12, num_beams=2),
                    GenerationOptions(max_new_tokens=12, top_k=1, temperature=0.7)):
        reply = answer_batch(model, tok, "v1", [conv], [[image]], options=options)[0]
        pieces = list(stream_answer(model, tok, "v1", conv, [image], options=options))
        assert "".join(pieces) == reply, options
        if options.stop:
            assert reply == full[: full.index(stop)].strip() and len(reply) < len(full)
        if options.top_k == 1:  # sampling among one candidate is greedy
            assert reply == full
    with pytest.raises(ValueError, match="context is 512"):
        list(stream_answer(model, tok, "v1", [{"from": "human", "value": "shape " * 600}], []))


def test_chat_cli_options_and_bfloat16(folder, capsys):
    image = str(folder / "images" / "a.png")
    base = ["chat", "--model", str(folder / "model"), "--image", image, "--prompt", "What color?",
            "--max-new-tokens", "6", "--device", "cpu"]
    cli_main(base)
    greedy = capsys.readouterr().out
    cli_main([*base, "--temperature", "0.9", "--top-k", "1", "--top-p", "0.5", "--repetition-penalty", "1.0"])
    assert capsys.readouterr().out == greedy  # top-k 1 leaves the greedy token only
    cli_main([*base, "--dtype", "bfloat16", "--num-beams", "2"])
    out = capsys.readouterr()
    assert "parameters x 2 bytes (bfloat16)" in out.err and out.out.endswith("\n")
    cli_main([*base, "--dtype", "float16"])  # LLaVA-1.5's releases are float16: "auto" on a CPU gives this
    out = capsys.readouterr()
    assert "parameters x 2 bytes (float16)" in out.err and out.out.endswith("\n")
    model, _ = load_for_inference(folder / "model", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
