"""``bench/gpu_check.py --tiny``: every section of the prepared GPU run, at toy sizes on the CPU.

The figures of a tiny run mean nothing; what is checked is that each path runs end to end and that the
pairs it times compute the same thing (same weights and inputs on both sides).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_tiny_run_covers_every_section(tmp_path, capsys):
    result = _gpu_check().main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    for title in ("LLaVA training step", "ImageBind embedding", "GLIP-T vs Grounding DINO-T"):
        assert title in printed

    llava = result["llava"]
    for stage in ("stage1", "stage2"):
        sides = llava[stage]
        assert _positive(sides["ratio"])
        for side in ("ours", "transformers"):
            assert _positive(sides[side]["step_s"]) and _positive(sides[side]["peak_mib"])
            assert math.isfinite(sides[side]["first_step_loss"])
        # Same weights (transformers' llava holds our parameter storage), same batch, fp32: the two losses differ
        # only by reduction order (dot products of <= 128 terms, |logits| ~ 1: ~1e-5 relative at worst on a
        # loss near ln(264) = 5.6). A wrong label shift or image placement moves the loss by > 0.01.
        before = sides["loss_before_training"]
        assert abs(before["ours"] - before["transformers"]) < 1e-4, before
    # Stage 1 trains the projector only; stage 2 the LM as well.
    assert llava["stage1"]["ours"]["trainable"] == llava["stage1"]["transformers"]["trainable"]
    assert llava["stage2"]["ours"]["trainable"] == llava["stage2"]["transformers"]["trainable"]
    assert llava["stage1"]["ours"]["trainable"] < llava["stage2"]["ours"]["trainable"]

    imagebind = result["imagebind"]
    assert set(imagebind["rows"]) == {"vision", "text", "audio", "depth", "thermal", "imu"}
    for row in imagebind["rows"].values():
        assert _positive(row["ratio"]) and _positive(row["ours_peak_mib"])
        # --tiny runs ours in fp32 beside our own fp32 copy: the same computation, so cosine 1 up to rounding.
        assert row["min_cosine"] > 0.9999

    glip = result["glip"]
    assert _positive(glip["ratio"]) and _positive(glip["glip"]["ms"]) and _positive(glip["grounding_dino"]["ms"])
