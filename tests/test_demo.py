"""The main-job demo in its reduced CI mode."""

import json

from loqjax import demo


def test_quick_demo_runs_and_reports(tmp_path, capsys):
    demo.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "=== loqjax unified demo" in out
    assert set(summary["jobs"]) == set(demo.TASKS)
    for job in summary["jobs"].values():
        first, last = job["train_loss_first_last"]
        assert last < first
        assert 0.0 <= job["exact_match_before"] <= 1.0 and 0.0 <= job["exact_match_after"] <= 1.0
    assert summary["overall"]["requests"] > 0 and summary["overall"]["steps"] > 0
    events = {json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").open()}
    assert events == {"step", "request", "train", "eval"}
