"""The miniature reproduction end to end with very small settings (the real run is the main job)."""

import pytest


@pytest.mark.slow  # about a minute on 2 shared cores
def test_reproduce_smoke(tmp_path):
    from mmr_llava.reproduce import run

    section = run(tmp_path, n_train=8, n_eval=4, stage1_steps=1, stage2_epochs=1)
    assert "| No instruction tuning |" in section and "| Full data |" in section
    assert (tmp_path / "llava_ablation.png").stat().st_size > 0 and (tmp_path / "llava_loss.png").is_file()
