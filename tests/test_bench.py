"""The benchmark scripts stay runnable: bench/gpu.py's CPU smoke runs the code a GPU run will run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_bench_smoke_runs_every_row_it_can_on_cpu_and_writes_its_table(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )

    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads((tmp_path / "gpu-bench.json").read_text())
    rows = {(r["setting"], r["cache"]): r for r in table["rows"]}
    assert "random weights" in table["header"]["what"]
    measured = [r for r in rows.values() if not r["skipped"]]
    assert {"diffusers-bf16 (baseline)", "bf16", "int8", "gguf-q8_0", "cpu-best"} <= {
        r["setting"] for r in measured
    }
    assert all(r["s_image"] > 0 and r["ratio"] > 0 and r["images_per_hour"] > 0 for r in measured)
    assert rows[("cpu-best", "taylorseer:4:1")]["full_steps"] == "4/8", "a cache row says how many steps ran"
    assert rows[("fp8dq", "none")]["skipped"] == "needs a CUDA GPU"
    assert "| setting | cache | s/image |" in (tmp_path / "gpu-bench.md").read_text()
