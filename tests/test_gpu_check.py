"""benchmarks/gpu_check.py end to end on the CPU, on the tiny OPT (its --device cpu dry run)."""

from __future__ import annotations

import json


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    from benchmarks.gpu_check import main

    rc = main([str(tmp_path), "--device", "cpu", "--tiny", "--repeats", "1", "--sections", "env", "replay",
               "zo_step"])
    assert rc == 0
    replay = json.loads((tmp_path / "replay.json").read_text())
    assert replay["ok"] and replay["rademacher_float16"]["bit_identical"]  # CPU vs CPU here
    step = json.loads((tmp_path / "zo_step.json").read_text())
    assert step["philox/rademacher"]["step_s"] > 0 and step["mezo_style_step_s"] > 0
