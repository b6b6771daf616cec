"""Miniature reproduction of the Multimodal-CoT ablation (paper Tables 2, 3 and 5, Figure 3).

On generated ScienceQA-format problems (``synthetic.py``: a colour or arrow direction visible only in the
image features, combined with a rule keyed by the context to reach the answer, plus text-only
questions), train the ``mini`` gated-fusion T5 from scratch four ways:

* no-CoT: QCM->A with vision;
* one-stage: QCM->RA (rationale then answer in one output) with vision;
* two-stage w/o vision: QCM->R, then QCMR->A on the generated rationale, image features all zero;
* two-stage with vision: the same with the features (Multimodal-CoT).

and report category accuracy, stage-1 rationale ROUGE-L, and how often the stage-1 rationale of an image
question names the wrong colour/direction, i.e. misreports the image ("hallucinated"), with and without
vision.

    python -m mmr_mmcot.reproduce --out DIR [--seed N]

Design history (measured once each on 2 shared cores, 120 steps per stage, generated-problem seed 0):
one-hop questions (the answer is the perceived value itself) gave no-CoT = one-stage = 88.75 Avg against
82.5 for two-stage with vision, since there was no chain to reason through. ``chain="listed"`` (stage 1 must
copy the matching rule out of four in the context) and ``chain="keyed"`` with four places (a 4 x 4 table)
left every row near chance on IMG (15-34%): the second hop was not learned in this budget, although
stage 1 with vision perceived the value in every test image. Two places (the current default) are
learned well enough that the two-stage rationale can help: with seed 0 two-stage with vision led (62.50
Avg vs 58.75 no-CoT, 51.25 one-stage), with seed 1 it did not (51.25 vs 56.25 and 53.75); the vision and
hallucination effects held with both seeds (IMG 56.0 vs 34.0 and 47.4 vs 28.1; hallucinated rationales
0% vs 78% and 0% vs 86%).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from .metrics import CATEGORIES, category_accuracy, extract_predictions, format_table
from .synthetic import COLORS, DIRECTIONS, corpus, write_release

N_TRAIN, N_TEST = 320, 80
STEPS = 120
CHAIN = "keyed"  # see synthetic.py; "listed" (copy the rule out of the context) is not learned in this budget
VARIANTS = ("no-CoT", "one-stage", "two-stage w/o vision", "two-stage with vision")
_ATTR_WORDS = re.compile(r"\b(" + "|".join(COLORS + DIRECTIONS) + r")\b")


def _config(data_dir: Path, out_dir: Path, name: str, **kw):
    from .train import TrainConfig

    return TrainConfig(
        model="mini",
        tokenizer=str(data_dir / "tok.model"),
        problems=str(data_dir / "problems.json"),
        pid_splits=str(data_dir / "pid_splits.json"),
        features=str(data_dir / "features.npy"),
        name_map=str(data_dir / "name_map.json"),
        use_caption=False,
        max_steps=STEPS,
        batch_size=16,
        eval_batch_size=40,
        lr=3e-3,
        warmup_ratio=0.05,
        source_len=144,
        rationale_len=32,
        answer_len=10,
        output_dir=str(out_dir / name.replace(" ", "_").replace("/", "")),
        save_every=10_000,
        **kw,
    )


def hallucination_rate(rationales: dict[str, str], problems: dict[str, dict]) -> float:
    """Share of image questions whose rationale names a wrong attribute or not the right one.

    The right one is the problem's ``image_fact`` (what the picture shows), or the correct choice for
    problems without one.
    """
    wrong = total = 0
    for pid, text in rationales.items():
        problem = problems[pid]
        if not problem.get("image"):
            continue
        truth = problem.get("image_fact") or problem["choices"][problem["answer"]]
        named = set(_ATTR_WORDS.findall(text))
        total += 1
        wrong += int(named != {truth})
    return 100.0 * wrong / max(total, 1)


def _run_variant(args: tuple[str, str, str]) -> dict:
    """One ablation row (runs in a worker process with one thread)."""
    name, data_dir, out_dir = args
    torch.set_num_threads(1)
    from .data import ScienceQA
    from .train import load_tokenizer, run, run_stage

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    start = time.perf_counter()
    data = ScienceQA.load(data_dir / "problems.json", data_dir / "pid_splits.json")
    row: dict = {"name": name}
    if name.startswith("two-stage"):
        cfg = _config(data_dir, out_dir, name, use_vision=name.endswith("with vision"))
        metrics = run(cfg)
        rationales = json.loads((Path(cfg.output_dir) / "stage1" / "generated_test.json").read_text())
        row.update(
            accuracy=metrics["answer"],
            failures=metrics["extraction_failures"],
            rougeL=metrics["rationale"]["rougeL"],
            hallucination=hallucination_rate(rationales, data.problems),
            examples={pid: rationales[pid] for pid in list(rationales)[:40]},
        )
    else:
        fmt = "QCM-A" if name == "no-CoT" else "QCM-EA"
        cfg = _config(data_dir, out_dir, name, use_vision=True)
        if fmt == "QCM-EA":
            cfg = replace(cfg, answer_len=36)
        tokenizer = load_tokenizer(cfg.tokenizer)
        _, generated = run_stage(cfg, data, tokenizer, Path(cfg.output_dir), fmt, cfg.answer_len)
        extraction = extract_predictions(generated["test"], data.problems)
        row.update(accuracy=category_accuracy(extraction.predictions, data.problems), failures=len(extraction.failures))
        if fmt == "QCM-EA":
            row["hallucination"] = hallucination_rate(generated["test"], data.problems)
    row["seconds"] = time.perf_counter() - start
    return row


def _plots(out_dir: Path, rows: dict[str, dict]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["two-stage w/o vision", "two-stage with vision"]
    rates = [rows[n]["hallucination"] for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bars = ax.bar(["w/o vision", "with vision"], rates, color=["#c0504d", "#4f81bd"])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylabel("hallucinated rationales (%)")
    ax.set_title("Stage-1 rationales on image questions")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(out_dir / "hallucination.png", dpi=120)
    plt.close(fig)

    cats = [c for c in CATEGORIES]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.2
    for i, name in enumerate(VARIANTS):
        values = [rows[name]["accuracy"][c] for c in cats]
        ax.bar([j + (i - 1.5) * width for j in range(len(cats))], values, width, label=name)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    return "hallucination.png", "accuracy.png"


def run(out_dir: Path, workers: int = 2, seed: int = 0) -> str:
    """Run the miniature ablation; writes plots into ``out_dir`` and returns a markdown section.

    Args:
        seed: Seed of the generated problems (the models' seed is the training config's).
    """
    from .tokenizer import train_sentencepiece

    start = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    files = write_release(data_dir, N_TRAIN, N_TEST, seed=seed, chain=CHAIN)
    problems = json.loads(files.problems.read_text())
    train_sentencepiece(corpus(problems), data_dir / "tok.model", 200)
    jobs = [(name, str(data_dir), str(out_dir / "runs")) for name in VARIANTS]
    # The two longest jobs first, so two workers finish together.
    order = ["two-stage with vision", "two-stage w/o vision", "one-stage", "no-CoT"]
    jobs.sort(key=lambda j: order.index(j[0]))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        rows = {row["name"]: row for row in pool.map(_run_variant, jobs)}
    hall_png, acc_png = _plots(out_dir, rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    minutes = (time.perf_counter() - start) / 60

    table = format_table({name: rows[name]["accuracy"] for name in VARIANTS})
    n_img = sum(1 for pid in json.loads(files.pid_splits.read_text())["test"] if problems[pid]["image"])
    without, with_ = rows["two-stage w/o vision"], rows["two-stage with vision"]
    example_pid = next(
        (
            pid
            for pid in with_["examples"]
            if problems[pid]["image"] and with_["examples"][pid] != without["examples"][pid]
        ),
        None,
    )
    lines = [
        f"Generated ScienceQA-format problems ({N_TRAIN} train, {N_TEST} test, {n_img} of the test questions "
        "with an image). An image question needs a two-hop chain: the colour of a shape or the direction of an "
        "arrow exists only in the image features (a one-hot patch at a random position among 8 tokens), and "
        + (
            "the context names one of two places; a fixed place x value table (the same in every problem, "
            "learned from training) maps the perceived value to the answer (a property or a town), so the "
            "direct mapping has 8 cases per subject where the hops have 4 and 2"
            if CHAIN == "keyed"
            else "the context gives this problem's rules (four colour->property or direction->town rules, "
            "permuted per problem and listed in random order)"
        )
        + ". The gold rationale states both hops ("
        + (
            '"The circle is red. On Tal, red things are soft."'
            if CHAIN == "keyed"
            else '"The circle is red. Red things are soft."'
        )
        + "). Text-only questions need the hint (counts, "
        f"TXT) or word knowledge (NO). Each row trains the `mini` gated-fusion T5 (d_model 64, 2+2 layers) from "
        f"scratch for {STEPS} steps per stage with random initialisation; answers are extracted from `The answer "
        "is (X)` without a random fallback (failures count as wrong). Stage 2 is trained on gold rationales and "
        "evaluated on the rationales stage 1 generated, as in the paper.",
        "",
        "### Ablation (accuracy %, ScienceQA categories; cf. paper Tables 2 and 5)",
        "",
        table,
        "",
        "| Method | answer extraction failures | stage-1 rationale ROUGE-L | hallucinated rationales on image questions |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        r = rows[name]
        rouge = f"{r['rougeL']:.1f}" if "rougeL" in r else "-"
        hall = f"{r['hallucination']:.1f}%" if "hallucination" in r else "-"
        lines.append(f"| {name} | {r['failures']} | {rouge} | {hall} |")
    lines += [
        "",
        f"![hallucinated rationale rate with and without vision]({hall_png})",
        "",
        f"![accuracy by category]({acc_png})",
        "",
    ]
    if example_pid:
        p = problems[example_pid]
        lines += [
            f"Example (test problem {example_pid}: {p['question']} answer: {p['choices'][p['answer']]}):",
            f'stage 1 without vision wrote "{without["examples"][example_pid]}"; with vision '
            f'"{with_["examples"][example_pid]}".',
            "",
        ]
    avg = {n: rows[n]["accuracy"]["Avg"] for n in VARIANTS}
    img = {n: rows[n]["accuracy"]["IMG"] for n in VARIANTS}
    mm, direct = avg["two-stage with vision"], max(avg["no-CoT"], avg["one-stage"])
    claims = [
        (
            "Two-stage with vision beats no-CoT and one-stage (Tables 2, 5)",
            f"Avg {mm:.1f} vs no-CoT {avg['no-CoT']:.1f}, one-stage {avg['one-stage']:.1f}",
            mm > direct,
        ),
        (
            "One-stage QCM->RA is no better than no-CoT QCM->A (Table 2)",
            f"Avg {avg['one-stage']:.1f} vs {avg['no-CoT']:.1f}",
            avg["one-stage"] <= avg["no-CoT"],
        ),
        (
            "Two-stage without vision is much worse than with it (Table 5)",
            f"IMG {img['two-stage w/o vision']:.1f} vs {img['two-stage with vision']:.1f}; "
            f"Avg {avg['two-stage w/o vision']:.1f} vs {mm:.1f}",
            img["two-stage with vision"] - img["two-stage w/o vision"] >= 10,
        ),
        (
            "Vision features cut hallucinated rationales (Figure 3)",
            f"{without['hallucination']:.1f}% without vision vs {with_['hallucination']:.1f}% with",
            with_["hallucination"] < without["hallucination"],
        ),
    ]
    lines += [
        "### Which of the paper's claims this run reproduces",
        "",
        "| Paper claim | This run | Reproduced |",
        "|---|---|---|",
        *[f"| {claim} | {numbers} | {'yes' if ok else 'no'} |" for claim, numbers, ok in claims],
        "",
        f"The accuracy margins are small next to the test set: one question is {100 / N_TEST:.2f} points "
        f"(two-stage with vision vs the best direct row: {(mm - direct) * N_TEST / 100:+.0f} questions), "
        + (
            "and this is one seed: with generated-problem seed 1 (`--seed 1`) the same code gave two-stage with "
            "vision 51.25 Avg against 56.25 for no-CoT and 53.75 for one-stage, so the first claim is "
            "seed-dependent at this scale (the second held there too). The vision and hallucination effects are "
            "large with both seeds (seed 1: IMG 47.4 vs 28.1, hallucinated rationales 0% vs 86%)."
            if seed == 0
            else f"and this is one seed ({seed}; the default is 0), so small margins are not significant."
        ),
        "",
        "Hallucinated = the stage-1 rationale misreports what the image shows (names a wrong colour/direction, "
        "or none). The paper's numbers come from ScienceQA with pretrained backbones (UnifiedQA-T5 and DETR/CLIP "
        "features); this miniature trains a tiny model from scratch on generated problems, so only the "
        "direction of each effect is comparable.",
        "",
        f"Wall time {minutes:.1f} min with {workers} worker processes (one thread each); per-row seconds: "
        + ", ".join(f"{n} {rows[n]['seconds']:.0f}" for n in VARIANTS)
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Multimodal-CoT miniature reproduction")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated problems")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    section = run(args.out, args.workers, args.seed)
    (args.out / "section.md").write_text(section)
    print(section)


if __name__ == "__main__":
    main()
