"""The GPU suite's CPU dry run: every part runs end to end at tiny sizes, so the suite is ready
(and cannot rot) for when a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_part_of_the_gpu_suite_runs_on_cpu_at_tiny_sizes(tmp_path):
    suite = _suite()
    out = tmp_path / "gpu_results.json"
    assert suite.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["part"] for r in payload["results"]] == list(suite.PARTS)
    for result in payload["results"]:
        assert result["status"] == "ok" and result["rows"], result
        assert not any("error" in row for row in result["rows"]), result["rows"]
    torchrun = payload["results"][-1]["rows"][0]
    assert torchrun["ok"] and torchrun["checkpoints"]
    assert (tmp_path / "gpu_results.md").read_text().count("###") == len(suite.PARTS)


def test_a_part_that_fails_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    suite = _suite()
    real = suite.run_part

    def fake(part, device, smoke, cap):
        if part == "scan":
            return {"part": part, "status": "timeout", "cap_s": cap, "seconds": cap}
        return {"part": part, "status": "ok", "seconds": 0.0, "rows": [{"x": 1.0}]}

    monkeypatch.setattr(suite, "run_part", fake)
    out = tmp_path / "r.json"
    assert suite.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 1
    statuses = {r["part"]: r["status"] for r in json.loads(out.read_text())["results"]}
    assert statuses["scan"] == "timeout" and statuses["torchrun"] == "ok"
    assert real is not fake
