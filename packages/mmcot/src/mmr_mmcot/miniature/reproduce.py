"""Miniature reproduction of the Multimodal-CoT ablation (paper Tables 2, 3 and 5, Figure 3).

On generated ScienceQA-format problems (``synthetic.py``: a colour or arrow direction visible only in the
image features, combined with a rule keyed by the context to reach the answer, plus text-only
questions), train the ``mini-unifiedqa`` gated-fusion T5 from scratch four ways:

* no-CoT: QCM->A with vision;
* one-stage: QCM->RA (rationale then answer in one output) with vision;
* two-stage w/o vision: QCM->R, then QCMR->A on the generated rationale, image features all zero;
* two-stage with vision: the same with the features (Multimodal-CoT).

and report category accuracy, stage-1 rationale ROUGE-L, and how often the stage-1 rationale of an image
question names the wrong colour/direction, i.e. misreports the image ("hallucinated"), with and without
vision. Every row is run on several data seeds (a new release each) and reported as mean and std.

    python -m mmr_mmcot.miniature.reproduce --out DIR [--seeds 0 1 2] [--steps 150] [--n-test 200]

Design history (each measured on 2 shared cores, from generated-problem seed 0 unless said):

* One-hop questions (the answer is the perceived value itself) gave no-CoT = one-stage = 88.75 Avg against
  82.5 for two-stage with vision: there was no chain to reason through.
* ``chain="listed"`` (copy the matching rule out of four in the context) and ``"keyed"`` with four places
  left every row near chance on IMG (15-34%) in 120 steps.
* ``"keyed"`` with two places, the ``mini`` size (T5 v1.1 layout, dropout 0.1, an untied lm_head with
  unit-variance weights: the first loss is ~35), a 148-piece unigram vocabulary (prompts of 50-75 pieces), 120 steps, 80 test
  questions: two-stage with vision led no-CoT by 3 questions with seed 0 and trailed by 4 with seed 1.
  On 200 test questions its stage 1 named the perceived value in 100% of image questions but the answer
  word in only 53%, the same as no-CoT's IMG accuracy (53%): neither had learned the place x value table.
* With 300 steps, the T5 v1.0 layout and no dropout, stage 1 learned the table (answer word right in
  100%) while no-CoT did not (IMG 73%): Avg 90.5 vs 69.5. 300 steps x 6 trainings x 3 seeds does not fit
  the 4-minute budget, so the current setup cuts the cost per step instead: a word-level vocabulary (one
  piece per word, prompts of 25-36 pieces) with ``mini-unifiedqa``. 150 steps then suffice for stage 1
  (answer word right in 100% of the image questions of seeds 0, 1 and 2) while no-CoT stays near 55 Avg
  (this run's table). A higher learning rate (1e-2) broke stage 2 (IMG 28%). The word-level vocabulary
  exposed a corpus gap: "(D)." was not in the tokenizer corpus, so answers D decoded as <unk>.
* The text-only rationales first named the answer in another form than its option ("There are more
  tables." for the option "table", "River names a thing." for "river"): distinct word-level tokens, and
  every row stayed near chance on them. They now name it as the option writes it; LAN and NO still stay
  near chance in 150 steps (the comparison of two number words and the noun list are not learned).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from mmr_core.utils import mean_std, progress
from mmr_mmcot.metrics import CATEGORIES, category_accuracy, extract_predictions

from .synthetic import COLORS, DIRECTIONS, corpus, write_release

N_TRAIN, N_TEST = 320, 200
STEPS = 150
SEEDS = (0, 1, 2)
MODEL = "mini-unifiedqa"
CHAIN = "keyed"  # see synthetic.py; "listed" (copy the rule out of the context) is not learned in this budget
DATA_TEXT = (
    "An image question needs a two-hop chain: the colour of a shape or the direction of an arrow exists only in "
    "the image features (a one-hot patch at a random position among 8 tokens), and the context names one of two "
    "places; a fixed place x value table (the same in every problem, learned from training) maps the perceived "
    'value to the answer (a property or a town). The gold rationale states both hops ("The circle is red. On '
    'Tal, red things are soft."). Text-only questions need the hint (counts, TXT) or word knowledge (NO).'
)
VARIANTS = ("no-CoT", "one-stage", "two-stage w/o vision", "two-stage with vision")
_ATTR_WORDS = re.compile(r"\b(" + "|".join(COLORS + DIRECTIONS) + r")\b")


def _config(data_dir: Path, out_dir: Path, name: str, steps: int = STEPS, **kw):
    from mmr_mmcot.train import TrainConfig

    return TrainConfig(
        model=MODEL,
        tokenizer=str(data_dir / "tok.model"),
        problems=str(data_dir / "problems.json"),
        pid_splits=str(data_dir / "pid_splits.json"),
        features=str(data_dir / "features.npy"),
        name_map=str(data_dir / "name_map.json"),
        use_caption=False,
        max_steps=steps,
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


def _run_variant(args: tuple[int, str, str, str, int]) -> dict:
    """One ablation row for one data seed (runs in a worker process with one thread)."""
    seed, name, data_dir, out_dir, steps = args
    torch.set_num_threads(1)
    from mmr_mmcot.data import ScienceQA
    from mmr_mmcot.train import load_tokenizer, run, run_stage

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    start = time.perf_counter()
    data = ScienceQA.load(data_dir / "problems.json", data_dir / "pid_splits.json")
    row: dict = {"name": name, "seed": seed}
    if name.startswith("two-stage"):
        cfg = _config(data_dir, out_dir, name, steps, use_vision=name.endswith("with vision"))
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
        cfg = _config(data_dir, out_dir, name, steps, use_vision=True)
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


def summarize(runs: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per variant: mean and std over seeds of each category accuracy and of the rationale measures.

    Args:
        runs: ``{seed: {variant: row}}`` as ``_run_variant`` returns them.

    Returns:
        ``{variant: {"accuracy": {cat: (mean, std)}, "hallucination": (mean, std), "rougeL": ...,
        "failures": total}}`` (rationale measures only for the variants that have them).
    """
    seeds = sorted(runs)
    out: dict[str, dict] = {}
    for name in VARIANTS:
        rows = [runs[s][name] for s in seeds]
        summary: dict = {"accuracy": {}, "failures": sum(r["failures"] for r in rows)}
        for cat in CATEGORIES:
            values = [r["accuracy"][cat] for r in rows if not math.isnan(r["accuracy"].get(cat, math.nan))]
            summary["accuracy"][cat] = mean_std(values) if values else (math.nan, math.nan)
        for key in ("hallucination", "rougeL"):
            # rougeL is None for a seed whose stage 1 generated only empty rationales (nothing to score).
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[key] = mean_std(values)
        out[name] = summary
    return out


def _json_ready(value):
    """``value`` with every NaN as None (standard JSON: a category without problems has no mean)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _plots(out_dir: Path, runs: dict[int, dict[str, dict]], summary: dict[str, dict]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(runs)
    names = ["two-stage w/o vision", "two-stage with vision"]
    means = [summary[n]["hallucination"][0] for n in names]
    stds = [summary[n]["hallucination"][1] for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bars = ax.bar(["w/o vision", "with vision"], means, yerr=stds, capsize=6, color=["#c0504d", "#4f81bd"])
    for i, name in enumerate(names):  # each seed as a dot, so the spread is visible
        ax.scatter([i] * len(seeds), [runs[s][name]["hallucination"] for s in seeds], color="black", s=12, zorder=3)
    ax.bar_label(bars, fmt="%.1f%%", padding=8)
    ax.set_ylabel("hallucinated rationales (%)")
    ax.set_title(f"Stage-1 rationales on image questions\n(mean and std over {len(seeds)} data seeds)", fontsize=9)
    ax.set_ylim(0, 110)
    fig.tight_layout()
    fig.savefig(out_dir / "hallucination.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.2
    for i, name in enumerate(VARIANTS):
        values = [summary[name]["accuracy"][c] for c in CATEGORIES]
        xs = [j + (i - 1.5) * width for j in range(len(CATEGORIES))]
        ax.bar(xs, [m for m, _ in values], width, yerr=[s for _, s in values], capsize=2, label=name)
    ax.set_xticks(range(len(CATEGORIES)), CATEGORIES)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    return "hallucination.png", "accuracy.png"


def _mean_std_table(summary: dict[str, dict]) -> str:
    lines = ["| Method | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for name in VARIANTS:
        cells = []
        for cat in CATEGORIES:
            mean, std = summary[name]["accuracy"][cat]
            cells.append("-" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(runs: dict[int, dict[str, dict]]) -> list[tuple[str, str, list[bool]]]:
    """The paper's claims checked on each seed: ``(claim, numbers of the mean, holds per seed)``."""
    seeds = sorted(runs)
    summary = summarize(runs)

    def avg(name: str, seed: int | None = None, cat: str = "Avg") -> float:
        return summary[name]["accuracy"][cat][0] if seed is None else runs[seed][name]["accuracy"][cat]

    def hall(name: str, seed: int | None = None) -> float:
        return summary[name]["hallucination"][0] if seed is None else runs[seed][name]["hallucination"]

    mm, wo = "two-stage with vision", "two-stage w/o vision"
    return [
        (
            "Two-stage with vision beats no-CoT QCM->A (paper: 84.91, Table 5, vs 80.40, Table 2)",
            f"Avg {avg(mm):.1f} vs {avg('no-CoT'):.1f}",
            [avg(mm, s) > avg("no-CoT", s) for s in seeds],
        ),
        (
            "Two-stage beats one-stage QCM->RA (Table 5: 84.91 vs 82.57 w/o two-stage framework)",
            f"Avg {avg(mm):.1f} vs {avg('one-stage'):.1f}; IMG {avg(mm, cat='IMG'):.1f} vs "
            f"{avg('one-stage', cat='IMG'):.1f}",
            [avg(mm, s) > avg("one-stage", s) for s in seeds],
        ),
        (
            "Two-stage without vision is much worse than with it (Table 5: 70.53 vs 84.91; here: >= 10 points on IMG)",
            f"IMG {avg(wo, cat='IMG'):.1f} vs {avg(mm, cat='IMG'):.1f}; Avg {avg(wo):.1f} vs {avg(mm):.1f}",
            [avg(mm, s, "IMG") - avg(wo, s, "IMG") >= 10 for s in seeds],
        ),
        (
            "Vision features cut hallucinated rationales (Figure 3)",
            f"{hall(wo):.1f}% without vision vs {hall(mm):.1f}% with",
            [hall(mm, s) < hall(wo, s) for s in seeds],
        ),
    ]


def _discussion(runs: dict[int, dict[str, dict]], summary: dict[str, dict], n_test: int) -> str:
    """What the numbers say about each row, in words (computed, so it stays true when the numbers move)."""
    mean = {n: summary[n]["accuracy"] for n in VARIANTS}
    mm, one, direct = mean["two-stage with vision"], mean["one-stage"], mean["no-CoT"]
    gap = [
        (runs[s]["two-stage with vision"]["accuracy"]["Avg"] - runs[s]["no-CoT"]["accuracy"]["Avg"]) * n_test / 100
        for s in sorted(runs)
    ]
    text_only = max(mean[n][c][0] for n in VARIANTS for c in ("LAN", "NO"))
    diff, spread = mm["Avg"][0] - one["Avg"][0], max(mm["Avg"][1], one["Avg"][1])
    if abs(diff) <= spread:
        verdict = (
            f"the difference ({diff:+.1f}) is within the seed spread (± {spread:.1f}), so the paper's small "
            "two-stage-over-one-stage gain (84.91 vs 82.57 on ScienceQA) is not established at this scale"
        )
    elif diff > 0:
        verdict = f"two-stage leads by {diff:.1f}, more than the seed spread (± {spread:.1f}), as in the paper"
    else:
        verdict = f"one-stage leads by {-diff:.1f}, more than the seed spread (± {spread:.1f}): not as in the paper"
    return (
        f"Two-stage with vision leads no-CoT by {min(gap):.0f}-{max(gap):.0f} test questions per seed: its stage 1 "
        f"names the perceived value and the keyed answer word, stage 2 reads the word (IMG {mm['IMG'][0]:.1f} vs "
        f"{direct['IMG'][0]:.1f}), while QCM->A has to learn the place x value table from the answer letter alone. "
        "One-stage QCM->RA with vision writes the same rationale before its answer and does about as well on image "
        f"questions (IMG {one['IMG'][0]:.1f} vs {mm['IMG'][0]:.1f}; Avg {one['Avg'][0]:.1f} ± {one['Avg'][1]:.1f} vs "
        f"{mm['Avg'][0]:.1f} ± {mm['Avg'][1]:.1f}): {verdict}. The text-only questions (LAN, NO) stay near chance in "
        f"every row (at most {text_only:.1f} on average): their differences between rows are noise."
    )


def run(
    out_dir: Path,
    workers: int = 2,
    seeds: tuple[int, ...] = SEEDS,
    steps: int = STEPS,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
) -> str:
    """Run the miniature ablation once per data seed; writes plots into ``out_dir``, returns a markdown section.

    Args:
        workers: Worker processes (one thread each); the (seed, row) jobs are spread over them.
        seeds: Seeds of the generated problems (each seed: a new release and a new tokenizer; the models'
            seed is the training config's).
        steps: Optimizer steps per stage.
        n_train: Generated training problems per seed.
        n_test: Generated test problems per seed.
    """
    from mmr_mmcot.tokenizer import train_sentencepiece

    if not seeds:
        raise ValueError("seeds must name at least one data seed")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    jobs = []
    releases = {}
    for seed in seeds:
        data_dir = out_dir / f"seed{seed}" / "data"
        files = write_release(data_dir, n_train, n_test, seed=seed, chain=CHAIN)
        problems = json.loads(files.problems.read_text())
        # One piece per word: prompts half as long, and every answer-bearing word is one token.
        train_sentencepiece(corpus(problems), data_dir / "tok.model", 250, model_type="word")
        releases[seed] = (files, problems)
        jobs += [(seed, name, str(data_dir), str(out_dir / f"seed{seed}" / "runs"), steps) for name in VARIANTS]
    # The longest jobs first, so the workers finish together.
    order = ["two-stage with vision", "two-stage w/o vision", "one-stage", "no-CoT"]
    jobs.sort(key=lambda j: order.index(j[1]))
    runs: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for row in progress(pool.map(_run_variant, jobs), desc="ablation rows", total=len(jobs)):
            runs[row["seed"]][row["name"]] = row
    summary = summarize(runs)
    hall_png, acc_png = _plots(out_dir, runs, summary)
    (out_dir / "results.json").write_text(
        json.dumps(_json_ready({"runs": {str(s): r for s, r in runs.items()}, "summary": summary}), indent=1, allow_nan=False)
    )
    minutes = (time.perf_counter() - start) / 60

    files, problems = releases[seeds[0]]
    n_img = [
        sum(1 for pid in json.loads(releases[s][0].pid_splits.read_text())["test"] if releases[s][1][pid]["image"])
        for s in seeds
    ]
    lines = [
        f"Generated ScienceQA-format problems ({n_train} train and {n_test} test per data seed, "
        f"{min(n_img)}-{max(n_img)} of the test questions with an image), {len(seeds)} data seeds "
        f"({', '.join(map(str, seeds))}). " + DATA_TEXT + " Each row trains the `mini-unifiedqa` gated-fusion T5 "
        f"(T5 v1.0 layout as UnifiedQA, d_model 64, 2+2 layers, word-level vocabulary) from scratch for {steps} steps per stage with random initialisation; answers "
        "are extracted from `The answer is (X)` without a random fallback (failures count as wrong). Stage 2 is "
        "trained on gold rationales and evaluated on the rationales stage 1 generated, as in the paper.",
        "",
        f"### Ablation (accuracy %, mean ± std over {len(seeds)} data seeds; cf. paper Tables 2 and 5)",
        "",
        _mean_std_table(summary),
        "",
        "| Method | answer extraction failures (all seeds) | stage-1 rationale ROUGE-L (paper's definition) | "
        "hallucinated rationales on image questions |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        r = summary[name]
        rouge = "{:.1f} ± {:.1f}".format(*r["rougeL"]) if "rougeL" in r else "-"
        hall = "{:.1f} ± {:.1f} %".format(*r["hallucination"]) if "hallucination" in r else "-"
        lines.append(f"| {name} | {r['failures']} | {rouge} | {hall} |")
    lines += [
        "",
        "Average accuracy per seed:",
        "",
        "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
        *[f"| {n} | " + " | ".join(f"{runs[s][n]['accuracy']['Avg']:.2f}" for s in seeds) + " |" for n in VARIANTS],
        "",
        f"![hallucinated rationale rate with and without vision]({hall_png})",
        "",
        f"![accuracy by category]({acc_png})",
        "",
    ]
    without, with_ = runs[seeds[0]]["two-stage w/o vision"], runs[seeds[0]]["two-stage with vision"]
    example_pid = next(
        (
            pid
            for pid in with_["examples"]
            if problems[pid]["image"] and with_["examples"][pid] != without["examples"][pid]
        ),
        None,
    )
    if example_pid:
        p = problems[example_pid]
        lines += [
            f"Example (seed {seeds[0]}, test problem {example_pid}: {p['question']} Context: {p['hint']} "
            f"Answer: {p['choices'][p['answer']]}): stage 1 without vision wrote "
            f'"{without["examples"][example_pid]}"; with vision "{with_["examples"][example_pid]}".',
            "",
        ]
    checked = claims(runs)
    lines += [
        "### Which of the paper's claims this run reproduces",
        "",
        "| Paper claim | Mean over seeds | Holds in |",
        "|---|---|---|",
        *[f"| {claim} | {numbers} | {sum(ok)}/{len(ok)} seeds |" for claim, numbers, ok in checked],
        "",
        _discussion(runs, summary, n_test),
        "",
        f"One test question is {100 / n_test:.2f} points of one seed's Avg. Hallucinated = the stage-1 rationale "
        "misreports what the image shows (names a wrong colour/direction, or none). The paper's numbers come from "
        "ScienceQA with pretrained backbones (UnifiedQA-T5 and DETR/CLIP features); this miniature trains a tiny "
        "model from scratch on generated problems, so only the direction of each effect is comparable.",
        "",
        f"Wall time {minutes:.1f} min with {workers} worker process{'es' if workers != 1 else ''} (one thread each); "
        "mean seconds per row: "
        + ", ".join(f"{n} {sum(runs[s][n]['seconds'] for s in seeds) / len(seeds):.0f}" for n in VARIANTS)
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Multimodal-CoT miniature reproduction")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the generated problems (one run each)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per stage")
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-test", type=int, default=N_TEST)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    section = run(args.out, args.workers, tuple(args.seeds), args.steps, args.n_train, args.n_test)
    (args.out / "section.md").write_text(section)
    print(section)


if __name__ == "__main__":
    main()
