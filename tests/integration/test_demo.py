"""`interplab demo --fast`: every section of the tour is in the report, with sane numbers."""

from __future__ import annotations

import json
import math
import re

import pytest

from interplab.runs import run_recipe


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return run_recipe("demo", ["--fast"], root=root)


def _section(report: dict, title: str) -> list[dict]:
    for section in report["sections"]:
        if section["title"] == title:
            return section["blocks"]
    raise AssertionError(f"no section {title!r} in {[s['title'] for s in report['sections']]}")


def test_report_has_every_section(demo):
    assert json.loads((demo.run_dir / "status.json").read_text())["status"] == "done"
    report = json.loads((demo.run_dir / "report.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    for title in (
        "The model",
        "Next-token predictions",
        "Attention patterns",
        "IOI: patching attention heads",
        "Activations cached to disk",
        "A sparse autoencoder",
        "Features",
        "Timings",
    ):
        assert title in titles


def test_ioi_heads_are_patched(demo):
    ioi = json.loads((demo.run_dir / "ioi-heads.json").read_text())
    grid, sem = ioi["recovered"], ioi["recovered_sem"]
    assert len(grid) == 4 and all(len(row) == 4 for row in grid)  # storyworld-4l: 4 x 4 heads
    assert all(math.isfinite(v) for row in grid + sem for v in row)
    assert ioi["n"] == demo.config.ioi_n and math.isfinite(ioi["clean"]["sem"])
    # the top-heads table is the grid sorted by |recovered|
    top = ioi["top_heads"]
    flat = sorted((abs(v) for row in grid for v in row), reverse=True)
    assert [abs(r["recovered"]) for r in top] == pytest.approx(flat[: len(top)])
    for row in top:
        layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", row["head"]).groups())
        assert row["recovered"] == pytest.approx(grid[layer][head])
    blocks = _section(
        json.loads((demo.run_dir / "report.json").read_text()), "IOI: patching attention heads"
    )
    assert any(b["type"] == "figure" for b in blocks) and any(b["type"] == "table" for b in blocks)


def test_sae_metrics_are_finite(demo):
    evaluation = json.loads((demo.run_dir / "sae-evaluation.json").read_text())
    metrics = evaluation["metrics"]
    for key in ("fvu", "l0", "ce_recovered", "dead_fraction", "ce_clean", "ce_spliced"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key
    assert 0 < metrics["l0"] <= demo.config.k + 1e-6  # TopK: at most k latents per token
    assert 0 <= metrics["fvu"] < 1  # trained, so better than predicting the mean
    assert (demo.run_dir / "dictionaries" / "demo-sae" / "cfg.json").is_file()


def test_features_are_listed(demo):
    features = json.loads((demo.run_dir / "features.json").read_text())
    latents = features["latents"]
    assert len(latents) == demo.config.n_features
    page = demo.report_path.read_text()
    for entry in latents:
        assert entry["examples"], entry["latent"]
        best = entry["examples"][0]
        assert best["value"] > 0 and best["acts"][best["pos"] - best["start"]] == pytest.approx(
            best["value"], rel=1e-4
        )
        assert f"Latent {entry['latent']}" in page
    blocks = _section(json.loads((demo.run_dir / "report.json").read_text()), "Features")
    table = next(b for b in blocks if b["type"] == "table")
    assert len(table["rows"]) == len(latents)


def test_report_is_self_contained(demo):
    page = demo.report_path.read_text()
    assert "<script" not in page
    assert re.search(r'(?:src|href)="(?!data:|#)', page) is None
