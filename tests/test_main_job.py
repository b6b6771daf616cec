"""The main job's core step end to end: shards -> 2-process deepspeed launch -> export -> report section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_core_demo_trains_with_two_deepspeed_processes_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "core"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "core_demo.py"), "--out", str(out), "--steps", "12",
         "--batch-size", "32"],
        check=True, cwd=ROOT, timeout=600,
    )
    curve = json.loads((out / "curve.json").read_text())
    assert curve["world_size"] == 2
    assert len(curve["loss"]) == 12
    assert min(curve["loss"][-4:]) < curve["loss"][0]  # it learns, even in 12 steps
    section = (out / "section.md").read_text()
    assert "audio->image R@1" in section and "![loss curve](loss.png)" in section
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "model_fp32.safetensors").is_file()


def test_report_links_point_into_each_step_folder() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from reproduce import _relink
    finally:
        sys.path.pop(0)
    text = "![a](loss.png) [log](log.txt) [web](https://x.org/a.png) ![abs](/tmp/p.png)"
    assert _relink(text, "core") == (
        "![a](core/loss.png) [log](core/log.txt) [web](https://x.org/a.png) ![abs](/tmp/p.png)"
    )


def test_step_log_keeps_only_the_final_state_of_redrawn_progress_bars() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from step_scheduler import _last_redraw
    finally:
        sys.path.pop(0)
    assert _last_redraw(b"train:  10%|#   | 1/10\rtrain:  50%|#####| 5/10\rtrain: 100%|##########| 10/10") == (
        b"train: 100%|##########| 10/10"
    )
    assert _last_redraw(b"plain line") == b"plain line"
    assert _last_redraw(b"done\r") == b"done"
    assert _last_redraw(b"") == b""
