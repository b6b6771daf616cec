"""``mmr-llava``: chat with a checkpoint, evaluate on ScienceQA, convert checkpoints, train.

Examples::

    mmr-llava chat --model runs/s2/model --image cat.png                 # interactive, streaming
    mmr-llava chat --model runs/s2/model --image cat.png --prompt "What is this?"
    mmr-llava eval-sqa --model runs/s2/model --problems problems.json --split-file pid_splits.json \\
        --split test --image-folder scienceqa/images/test --out answers.jsonl
    mmr-llava convert SRC DST --to hf
    mmr-llava train --preset finetune data=... output_dir=...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _chat(args: argparse.Namespace) -> None:
    from mmr_llava.inference import answer_batch, load_for_inference

    model, tok = load_for_inference(args.model, args.tokenizer, args.vision_tower)
    images = list(args.image or [])
    history: list[dict[str, str]] = []

    def ask(text: str) -> str:
        if not history and images:
            text = "<image>\n" * len(images) + text
        history.append({"from": "human", "value": text})
        reply = answer_batch(model, tok, args.template, [history], [images], args.max_new_tokens,
                             args.temperature, on_text=lambda s: print(s, end="", flush=True))[0]
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


def _eval_sqa(args: argparse.Namespace) -> None:
    from mmr_llava.inference import answer_batch, load_for_inference
    from mmr_llava.scienceqa import evaluate, format_table

    problems = json.loads(Path(args.problems).read_text())
    if args.split_file:
        ids = json.loads(Path(args.split_file).read_text())[args.split]
        problems = {pid: problems[pid] for pid in ids}
    if args.limit:
        problems = dict(list(problems.items())[: args.limit])
    model, tok = load_for_inference(args.model, args.tokenizer, args.vision_tower)

    def answer_fn(questions, images):
        convs = [[{"from": "human", "value": q}] for q in questions]
        return answer_batch(model, tok, args.template, convs, images, max_new_tokens=args.max_new_tokens)

    res = evaluate(answer_fn, problems, args.image_folder, args.batch_size, args.out)
    print(format_table(res["scores"]))


_VISION_TOWER_HELP = ("CLIP folder (or cached Hub name) for a checkpoint saved without its vision tower, as LLaVA's "
                      "released ones are (default: the config's mm_vision_tower)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmr-llava", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat about images with a checkpoint (streams the reply)")
    chat.add_argument("--model", required=True, help="checkpoint folder (either layout)")
    chat.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    chat.add_argument("--vision-tower", default=None, help=_VISION_TOWER_HELP)
    chat.add_argument("--image", action="append", help="image file (repeat for several)")
    chat.add_argument("--template", default="v1")
    chat.add_argument("--prompt", default=None, help="one question, then exit")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    sqa = sub.add_parser("eval-sqa", help="ScienceQA accuracy by NAT/SOC/LAN/TXT/IMG/NO/G1-6/G7-12")
    sqa.add_argument("--model", required=True)
    sqa.add_argument("--tokenizer", default=None)
    sqa.add_argument("--vision-tower", default=None, help=_VISION_TOWER_HELP)
    sqa.add_argument("--problems", required=True, help="ScienceQA problems.json")
    sqa.add_argument("--split-file", default=None, help="pid_splits.json")
    sqa.add_argument("--split", default="test")
    sqa.add_argument("--image-folder", default=None, help="folder with <pid>/<image> files")
    sqa.add_argument("--template", default="v1")
    sqa.add_argument("--batch-size", type=int, default=8)
    sqa.add_argument("--max-new-tokens", type=int, default=8)
    sqa.add_argument("--limit", type=int, default=0)
    sqa.add_argument("--out", default=None, help="answers JSON-lines file")
    conv = sub.add_parser("convert", help="convert between the original and Hugging Face layouts",
                          add_help=False)
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    train = sub.add_parser("train", help="train (same options as packages/llava/train.py)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "chat":
        _chat(args)
    elif args.command == "eval-sqa":
        _eval_sqa(args)
    elif args.command == "convert":
        from mmr_llava.checkpoint import main as convert_main

        convert_main(args.rest)
    else:
        from mmr_llava.train import main as train_main

        train_main(args.rest)


if __name__ == "__main__":
    main()
