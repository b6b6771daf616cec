"""The main job: run every miniature reproduction and write one report (markdown, tables, plots).

Usage (from the repository root, inside .venv; scripts/reproduce.sh sets that up):
    python scripts/reproduce.py                 # everything, report in outputs/report/REPORT.md
    python scripts/reproduce.py --only llava    # one step (core, imagebind, medvlm, mmcot, llava)
    python scripts/reproduce.py --list
    python scripts/reproduce.py --jobs 1        # one step after the other (default: as many as CPU cores)

Each step runs in its own process so that one failure is reported without losing the others, several at
once (``step_scheduler.py``: each step's output goes to ``<out>/<step>/log.txt``, the terminal shows a
compact status and each step's result with its wall and CPU seconds). A
package takes part once it ships ``mmr_<name>.miniature.reproduce`` (or ``mmr_<name>.reproduce``) with
``run(out_dir: Path) -> str``, which writes its plots into ``out_dir`` and returns a markdown section
whose image links are relative to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_scheduler.py beside this file, also when imported
from step_scheduler import StatusDisplay, Step, StepResult, run_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
STEPS = ("core", *PACKAGES)
TITLES = {
    "core": "Shared core: 2-process DeepSpeed contrastive training on WebDataset shards",
    "imagebind": "ImageBind: emergent audio-text zero-shot",
    "medvlm": "MedVLM: attribute prompts beat class names",
    "mmcot": "Multimodal-CoT: two stages and vision features",
    "llava": "LLaVA: the instruction-tuning ablation",
}
# Each step's wall seconds on 2 idle AMD EPYC cores (2026-12-03; MM-CoT on the one worker it gets when steps
# share the cores; MedVLM with its 500-step recipe, 3 seeds on 3 workers, ~290 s beside the others, 600 s
# before): the length of its longest chain of work, however many cores it gets. Steps start in this
# order, the longest first: a step started last that is short per thread finishes with the others, while a long
# single-threaded one started last runs on alone with a core idle. Only the order matters.
WALL_SECONDS = {"medvlm": 290, "mmcot": 86, "llava": 83, "imagebind": 49, "core": 48}
# Options of a package's run() when steps share the cores (--jobs > 1). MM-CoT runs its 12 (seed, row) trainings
# on one worker process instead of two: the rows are independent and single-threaded, so its results are
# bitwise the same, and it no longer adds a third busy process beside LLaVA on 2 cores nor a second worker's
# imports. The four non-MedVLM steps, --jobs 2, 2 idle cores: 136 s wall and 259 CPU-s with one worker, 165 s
# and 313 CPU-s with two (MM-CoT itself 86 vs 114 CPU-s); one after the other (--jobs 1) 221 s and 284 CPU-s.
SHARED_OPTIONS = {"mmcot": {"workers": 1}}


def _find_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is a module, not a package (e.g. an old miniature.py)
        return False


def _package_command(name: str, out_dir: Path, options: dict | None = None) -> list[str] | None:
    """The step's command: ``run(out_dir, **options)`` of the package's miniature; None if it has none."""
    # The miniature in its own subpackage (mmr_<name>.miniature), or beside the library before that split.
    module = next((m for m in (f"mmr_{name}.miniature.reproduce", f"mmr_{name}.reproduce") if _find_module(m)), None)
    if module is None:
        return None
    code = (
        "import json, sys; from pathlib import Path; "
        f"from {module} import run; "
        "out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
        "section = run(out, **json.loads(sys.argv[2])); (out / 'section.md').write_text(section)"
    )
    return [sys.executable, "-c", code, str(out_dir), json.dumps(options or {})]


def _core_command(out_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "core_demo.py"), "--out", str(out_dir)]


def _relink(markdown: str, subdir: str) -> str:
    """Point a section's relative image/file links into its sub-folder of the report."""

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^(?:[a-z]+:|/|#)", target):
            return match.group(0)
        return f"{match.group(1)}({subdir}/{target})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, markdown)


def _step_env() -> dict[str, str]:
    # One OpenMP/MKL thread per process: steps run side by side, and oversubscribed OpenMP threads spin (many
    # times slower), while single-threaded processes time-slice fine. Every step's heavy part already ran on
    # one thread per process (its own torch.set_num_threads(1) or DeepSpeed's OMP_NUM_THREADS=1 per rank).
    # Progress bars on (unless the caller turned them off): they go to the step's log only, as their final
    # redraws, and feed the live status; unbuffered output keeps that status current.
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MMR_NO_PROGRESS=os.environ.get("MMR_NO_PROGRESS", "0"))


def _section(name: str, out_dir: Path, result: StepResult) -> dict:
    entry = {"name": name, "status": "ok", "seconds": result.wall, "cpu_seconds": result.cpu}
    section_path = out_dir / "section.md"
    if result.ok and section_path.is_file():
        return {**entry, "section": _relink(section_path.read_text(), name)}
    status = f"failed (exit {result.returncode})" if not result.ok else "failed (no section.md)"
    return {**entry, "status": status,
            "section": f"The step failed; the end of its log (`{name}/log.txt`):\n\n```\n{result.tail()}\n```"}


def run_all(names: list[str], out_root: Path, jobs: int, display: StatusDisplay | None = None) -> list[dict]:
    """Run the named steps (``jobs`` at a time, the longest first) and return their results in ``names`` order."""
    results: dict[str, dict] = {}
    steps = []
    for name in names:
        out_dir = out_root / name
        out_dir.mkdir(parents=True, exist_ok=True)
        options = SHARED_OPTIONS.get(name, {}) if jobs > 1 else {}
        command = _core_command(out_dir) if name == "core" else _package_command(name, out_dir, options)
        if command is None:
            results[name] = {"name": name, "status": "pending", "seconds": 0.0, "cpu_seconds": 0.0,
                             "section": f"`mmr_{name}.reproduce` does not exist yet: this package's miniature "
                                        "reproduction has not landed (see the open issue)."}
            continue
        steps.append(Step(name, command, out_dir / "log.txt", env=_step_env(), cwd=ROOT))
    if jobs > 1:  # the longest first, so that the short steps fill the cores beside it and nothing runs alone last
        steps.sort(key=lambda step: -WALL_SECONDS.get(step.name, 0))
    for result in run_steps(steps, jobs, display):
        results[result.name] = _section(result.name, out_root / result.name, result)
    return [results[name] for name in names]


def write_report(results: list[dict], out_root: Path, total_seconds: float, jobs: int = 1) -> Path:
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    lines = [
        "# mmr: miniature reproductions",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}), "
        f"in {total_seconds / 60:.1f} minutes ({jobs} step{'s' if jobs > 1 else ''} at a time; "
        f"{cpu:.0f} CPU seconds in all).",
        "",
        "| step | status | wall (min) | CPU (s) |",
        "|---|---|---|---|",
        *[f"| [{r['name']}](#{r['name']}) | {r['status']} | {r['seconds'] / 60:.1f} | {r.get('cpu_seconds', 0.0):.0f} |"
          for r in results],
        "",
    ]
    for r in results:
        lines += [f'<a id="{r["name"]}"></a>', f"## {TITLES[r['name']]}", "", r["section"].strip(), ""]
    report = out_root / "REPORT.md"
    report.write_text("\n".join(lines))
    (out_root / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "section"}
                                                       for r in results], indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=STEPS, action="append", help="run only this step (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "report", help="report folder")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="steps run at once (default: the number of CPU cores; 1: one after the other)")
    parser.add_argument("--list", action="store_true", help="list the steps and whether each is available")
    args = parser.parse_args(argv)
    if args.list:
        for name in STEPS:
            ready = name == "core" or _package_command(name, args.out) is not None
            print(f"{name:10s} {'ready' if ready else 'pending'}  {TITLES[name]}")
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    steps = list(dict.fromkeys(args.only or STEPS))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        results = run_all(steps, args.out, args.jobs)
    except KeyboardInterrupt:
        print("stopped: no report written", file=sys.stderr)
        return 130
    total = time.perf_counter() - start
    report = write_report(results, args.out, total, args.jobs)
    print(f"\nReport: {report} ({total / 60:.1f} min)")
    for r in results:
        print(f"  {r['name']:10s} {r['status']:20s} {r['seconds'] / 60:5.1f} min  {r['cpu_seconds']:6.0f} CPU-s")
    return 0 if all(r["status"] in ("ok", "pending") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
