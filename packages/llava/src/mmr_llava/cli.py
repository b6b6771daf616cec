"""``mmr-llava``: chat with a checkpoint, answer a question file, evaluate on ScienceQA, convert, train.

Examples::

    mmr-llava chat --model runs/s2/model --image cat.png                 # interactive, streaming
    mmr-llava chat --model runs/s2/model --image cat.png --prompt "What is this?"
    mmr-llava chat --model llava-v1.5-7b --device cuda --dtype bfloat16 --temperature 0.2 --top-p 0.9
    mmr-llava infer --model runs/s2/model --questions q.jsonl --image-folder imgs --answers answers.jsonl \\
        --num-chunks 8 --chunk-idx 0
    mmr-llava eval-sqa --model runs/s2/model --problems problems.json --split-file pid_splits.json \\
        --split test --image-folder scienceqa/images/test --out answers.jsonl
    mmr-llava demo --model runs/s2/model --port 7860                    # web chat on http://127.0.0.1:7860
    mmr-llava convert SRC DST --to hf
    mmr-llava train --preset finetune data=... output_dir=...
"""

from __future__ import annotations

import argparse
import sys


def _generation_options(args: argparse.Namespace):
    from mmr_llava.inference import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                             stop=tuple(args.stop or ()))


def _load(args: argparse.Namespace):
    """Model and tokenizer; the memory estimate goes to stderr before the weights are allocated."""
    from mmr_llava.inference import load_for_inference

    return load_for_inference(args.model, args.tokenizer, args.vision_tower, device=args.device, dtype=args.dtype,
                              report=lambda line: print(line, file=sys.stderr, flush=True))


def _chat(args: argparse.Namespace) -> None:
    from mmr_llava.inference import answer_batch

    model, tok = _load(args)
    options = _generation_options(args)
    images = list(args.image or [])
    history: list[dict[str, str]] = []

    def ask(text: str) -> str:
        if not history and images:
            text = "<image>\n" * len(images) + text
        history.append({"from": "human", "value": text})
        reply = answer_batch(model, tok, args.template, [history], [images],
                             on_text=lambda s: print(s, end="", flush=True), options=options)[0]
        print(flush=True)
        history.append({"from": "gpt", "value": reply})
        return reply

    if args.prompt is not None:
        ask(args.prompt)
        return
    print("Type a message (empty line or Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        print("ASSISTANT: ", end="", flush=True)
        ask(line.strip())


def _infer(args: argparse.Namespace) -> None:
    from mmr_llava.inference import answer_questions, get_chunk, model_id_from_path, read_questions

    questions = get_chunk(read_questions(args.questions), args.num_chunks, args.chunk_idx)
    model, tok = _load(args)
    counts = answer_questions(model, tok, questions, args.answers, args.template, args.image_folder,
                              _generation_options(args), args.batch_size, model_id_from_path(args.model))
    print(f"{args.answers}: {counts['answered']} answered, {counts['skipped']} already there "
          f"(chunk {args.chunk_idx} of {args.num_chunks}: {len(questions)} questions)")


def _eval_sqa(args: argparse.Namespace) -> None:
    from mmr_core.io import RecordError, read_json
    from mmr_llava.inference import answer_batch
    from mmr_llava.scienceqa import evaluate, format_table

    problems = read_json(args.problems)
    if not isinstance(problems, dict):
        raise RecordError(args.problems, "document", "problems", f"a {type(problems).__name__}",
                          "expected ScienceQA's problems.json: an object of problems by id")
    if args.split_file:
        splits = read_json(args.split_file)
        if not isinstance(splits, dict) or args.split not in splits:
            have = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise RecordError(args.split_file, "document", args.split, "no such split",
                              f"expected one of {have} (ScienceQA's pid_splits.json)")
        missing = [pid for pid in splits[args.split] if pid not in problems]
        if missing:
            raise RecordError(args.split_file, args.split, "ids", f"{len(missing)} ids not in {args.problems} "
                              f"(first: {missing[:3]})", "expected the split and the problems of one release")
        problems = {pid: problems[pid] for pid in splits[args.split]}
    if args.limit:
        problems = dict(list(problems.items())[: args.limit])
    model, tok = _load(args)

    def answer_fn(questions, images):
        convs = [[{"from": "human", "value": q}] for q in questions]
        return answer_batch(model, tok, args.template, convs, images, max_new_tokens=args.max_new_tokens)

    res = evaluate(answer_fn, problems, args.image_folder, args.batch_size, args.out)
    print(format_table(res["scores"]))


def _demo(args: argparse.Namespace) -> None:
    from mmr_llava.demo import launch, require_gradio

    require_gradio()  # before a model of many GB is loaded
    model, tok = _load(args)
    launch(model, tok, args.template, _generation_options(args), host=args.host, port=args.port)


_VISION_TOWER_HELP = ("CLIP folder (or cached Hub name) for a checkpoint saved without its vision tower, as LLaVA's "
                      "released ones are (default: the config's mm_vision_tower)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (either layout, sharded or not) or a "
                        "Hugging Face Hub id (org/name; from the local cache with HF_HUB_OFFLINE=1)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--vision-tower", default=None, help=_VISION_TOWER_HELP)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; "
                        "default %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights' dtype (default: the checkpoint's torch_dtype, float32 when it has none)")
    parser.add_argument("--template", default="v1", help="conversation template (default %(default)s, the "
                        "original's llava_v1)")


def _generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="default %(default)s")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="0: greedy (or beam search); > 0: sampling (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k likeliest tokens, 0: all (default %(default)s, transformers')")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default %(default)s)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already generated (default %(default)s: off)")
    parser.add_argument("--stop", action="append", help="extra string that ends the reply (repeatable)")


# User mistakes besides mmr_core.cli's own: bad data, settings and prompts are ValueErrors (DataError, RecordError,
# ImageReadError among them), a checkpoint that does not match the model a KeyError naming the file.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Run ``mmr-llava``; a user mistake prints ``error: ...`` and returns 2 (``mmr_core.cli.run_guarded``)."""
    from mmr_core.cli import run_guarded

    parser = argparse.ArgumentParser(prog="mmr-llava", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat about images with a checkpoint (streams the reply)")
    _model_arguments(chat)
    chat.add_argument("--image", action="append", help="image file (repeat for several)")
    chat.add_argument("--prompt", default=None, help="one question, then exit")
    _generation_arguments(chat, max_new_tokens=256, temperature=0.0)
    infer = sub.add_parser("infer", help="answer a JSON-lines question file (the original's model_vqa format: "
                           "question_id, image, text) into answers.jsonl, resumably, one chunk of several")
    _model_arguments(infer)
    infer.add_argument("--questions", required=True, help="question file: JSON lines with question_id, text and "
                       "optionally image")
    infer.add_argument("--image-folder", default=None, help="folder the questions' image paths are relative to")
    infer.add_argument("--answers", required=True, help="answers JSON-lines file; ids already in it are skipped")
    infer.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many consecutive "
                       "chunks, as the original's split_list (default %(default)s)")
    infer.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process answers (default "
                       "%(default)s)")
    infer.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default %(default)s)")
    # The original's model_vqa.py answers with up to 1024 new tokens; its v1.5 evaluation scripts set temperature 0.
    _generation_arguments(infer, max_new_tokens=1024, temperature=0.0)
    sqa = sub.add_parser("eval-sqa", help="ScienceQA accuracy by NAT/SOC/LAN/TXT/IMG/NO/G1-6/G7-12")
    _model_arguments(sqa)
    sqa.add_argument("--problems", required=True, help="ScienceQA problems.json")
    sqa.add_argument("--split-file", default=None, help="pid_splits.json")
    sqa.add_argument("--split", default="test")
    sqa.add_argument("--image-folder", default=None, help="folder with <pid>/<image> files")
    sqa.add_argument("--batch-size", type=int, default=8)
    sqa.add_argument("--max-new-tokens", type=int, default=8)
    sqa.add_argument("--limit", type=int, default=0)
    sqa.add_argument("--out", default=None, help="answers JSON-lines file")
    demo = sub.add_parser("demo", help="web chat (Gradio) about an image: upload, multi-turn, streaming, "
                          "sampling controls; needs the demo extra")
    _model_arguments(demo)
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s: this machine "
                      "only; 0.0.0.0 serves the network)")
    demo.add_argument("--port", type=int, default=7860, help="default %(default)s")
    # The original demo's defaults: temperature 0.2, 512 new tokens; the page's sliders start here.
    _generation_arguments(demo, max_new_tokens=512, temperature=0.2)
    conv = sub.add_parser("convert", help="convert between the original and Hugging Face layouts",
                          add_help=False)
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    train = sub.add_parser("train", help="train (same options as packages/llava/train.py)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return run_guarded(lambda: _run(args), USER_ERRORS)


def _run(args: argparse.Namespace) -> int:
    if args.command == "chat":
        _chat(args)
    elif args.command == "infer":
        _infer(args)
    elif args.command == "eval-sqa":
        _eval_sqa(args)
    elif args.command == "demo":
        _demo(args)
    elif args.command == "convert":
        from mmr_llava.checkpoint import main as convert_main

        convert_main(args.rest)
    else:
        from mmr_llava.train import main as train_main

        return train_main(args.rest)  # prints its own `error: ...` for a user mistake and returns 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
