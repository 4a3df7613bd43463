"""docs/benchmarks.md and docs/reliability.md are generated from the figures, never pasted."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.benchlib.report import markdown
from tests.support import figures

REPORT = {
    "quick": True, "store": "single", "cpus": 2,
    "run": {"date_utc": "2026-12-04 19:46", "duration_s": 61.0, "cpu_model": "Test CPU", "cpus": 2,
            "memory_gib": 3.8, "system": "Linux-test", "python": "3.11.9", "commit": "abc1234",
            "arguments": ["--quick"], "load_average": [1.0, 2.0, 3.0]},
    "ingest": [{"size": 102400, "concurrency": 8, "gateway_rps": 21.0, "gateway_mb_s": 2.1, "gateway_p50_ms": 300.0,
                "gateway_p99_ms": 900.0, "gateway_errors": 0, "s3_rps": 39.0, "discard_rps": 56.0,
                "ratio_vs_s3": 0.534, "ratio_vs_discard": 0.375, "catalog_group_size": 4.0,
                "cpu_limit_ratio": 0.61, "cpu_limit_ratio_high": 0.67,
                "cpu_ms_per_request": {"gateway_round": {"gateway": 3.0, "s3": 2.4},
                                       "s3_round": {"s3": 2.0, "client": 1.0},
                                       "discard_round": {}, "s3_at_gateway_rate": {"s3": 2.9}}}],
    "memory": {"baseline_mib": 100.0, "refused_status": 413, "growth_on_refused_50mib_mib": 1.0,
               "accepted_45mib_x8_statuses": [201] * 8, "peak_rss_mib": 200.0},
}


def test_benchmarks_doc_carries_the_runs_date_machine_and_figures() -> None:
    text = markdown(REPORT, "out.json")
    assert "2026-12-04 19:46 UTC" in text and "Test CPU, 2 CPUs" in text and "commit `abc1234`" in text
    assert "| 100 KiB | 8 | 21.0 | 2.1 |" in text and "**200.0 MiB**" in text
    assert "| 0.534 | 0.61 | 0.67 | 0.375 |" in text  # the ratio beside both CPU limits
    assert "| 2.4 | 2.0 | 1.0 | 2.9 | 4.0 |" in text  # the store's CPU: gateway round, direct, paced
    assert "Not in this run: dedup, forward, startup, neardup" in text


def test_reliability_doc_fills_every_section_from_the_figures(tmp_path: Path) -> None:
    run = {"date_utc": "2026-12-04 20:00", "cpus": 2, "cpu_model": "Test CPU", "system": "Linux", "commit": "abc"}
    (tmp_path / "bad_input.json").write_text(json.dumps({
        "title": "Bad input", "header": ["case", "expected", "got", "stored / spool / health"],
        "rows": [["no image part", "400", "400", "nothing stored, spool empty, healthy"]],
        "summary": {"cases": 1, "refused (4xx or hang-up)": 1,
                    "refused but left something (row, object, spool file)": 0,
                    "valid uploads with odd names or chunked framing, accepted (names sanitised)": 0,
                    "5xx answers": 0}, "run": run}))
    (tmp_path / "soak_short.json").write_text(json.dumps({
        "title": "Soak", "header": ["figure", "value"], "summary": {}, "run": run,
        "rows": [["acknowledged", "10"], ["delivered", "10"], ["lost", "0"], ["bad_requests_5xx", "0"]]}))
    text = figures.document(tmp_path)
    assert "{{" not in text and "Figures of the runs of 2026-12-04 20:00 UTC on Test CPU" in text
    assert "| no image part" in text and "1 of 1" in text and "10 / 10 / **0**" in text
    assert "Not in this generation: run `tests/integration/test_faults.py`" in text
