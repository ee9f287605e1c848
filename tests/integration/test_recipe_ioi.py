"""`interplab run ioi --fast` on storyworld-4l: the report, the roles and the circuit."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from interplab.errors import InterplabError
from interplab.recipes import ioi
from interplab.runs import start_run


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    torch.set_num_threads(1)
    config = ioi.Config(fast=True)
    with start_run("ioi", config, root=tmp_path_factory.mktemp("runs")) as run:
        report = ioi.run(config, run)
        path = report.write(run.dir / "report.html")
    data = json.loads((run.dir / "ioi-circuit.json").read_text())
    return {"config": config, "dir": run.dir, "html": path, "data": data}


def test_report_has_every_step_and_its_figures(result):
    report = json.loads((result["dir"] / "report.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    for title in (
        "1. The task",
        "2. Direct logit attribution and head knockouts",
        "3. Name movers",
        "4. S-inhibition heads",
        "5. Duplicate-token and induction heads",
        "6. The circuit and its faithfulness",
        "7. Self-repair",
        "Summary: which roles this model has",
    ):
        assert title in titles
    figures = [b for s in report["sections"] for b in s["blocks"] if b["type"] == "figure"]
    assert len(figures) >= 8
    names = ("task", "dla", "knockouts", "name-mover-scores", "circuit", "faithfulness")
    for name in (*names, "self_repair", "self_repair_split"):
        assert (result["dir"] / "figures" / f"{name}.png").is_file(), name
    page = result["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == len(figures)
    assert "<script" not in page and re.search(r'(?:src|href)="(?!data:|#)', page) is None


def test_self_repair_terms_add_up_to_the_total_effect(result):
    """The split is exact: downstream heads + MLPs + LN scale = total - direct, per head."""
    heads = result["data"]["self_repair"]["per_head"]
    assert len(heads) == 16
    for label, row in heads.items():
        split = sum(row["split"][k]["mean"] for k in ("heads", "mlps", "ln_scale"))
        assert split == pytest.approx(row["total"]["mean"] - row["direct"]["mean"], abs=1e-4), label


def _heads(data: dict) -> dict[str, dict]:
    return {row["head"]: row for row in data["heads"]}


def test_name_movers_attend_to_the_indirect_object(result):
    # selection uses the direct effect and the OV copy score, never attention, so this can fail
    data = result["data"]
    movers = data["roles"]["name_movers"]
    assert movers, "no name mover found"
    rows = _heads(data)
    for head in movers:
        row = rows[head]
        assert row["END->IO"] > row["END->S1"], head
        assert row["END->IO"] > row["END->S2"], head
        assert row["DLA"] > 0 and row["advantage"] > 0


def test_attention_scores_match_a_direct_recomputation(result):
    """The recipe's per-prompt position bookkeeping, against attention read straight from
    the model at the metadata positions."""
    import interplab as il

    config, data = result["config"], result["data"]
    model = il.load_model(config.model)
    task = il.tasks.ioi(model, n=config.n, seed=config.seed, split=config.split)
    head = (data["roles"]["name_movers"] or ["L1H2"])[0]
    layer, index = map(int, re.fullmatch(r"L(\d+)H(\d+)", head).groups())
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            task.clean_tokens, names_filter=f"blocks.{layer}.attn.hook_pattern"
        )
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, index]  # batch query key
    for name, key in (("END->IO", "io_pos"), ("END->S1", "s1_pos"), ("END->S2", "s2_pos")):
        expected = sum(
            float(pattern[b, meta["end_pos"], meta[key]]) for b, meta in enumerate(task.metadata)
        ) / len(task)
        assert _heads(data)[head][name] == pytest.approx(expected, abs=1e-5), name


def test_circuit_is_faithful_and_beats_random_circuits(result):
    faith = result["data"]["faithfulness"]
    found = faith["found"]["mean"]
    assert math.isfinite(found) and math.isfinite(faith["found"]["sem"])
    assert found > faith["random_mean"]
    assert found > faith["mlps_only"]["mean"]
    # exact edge patching with every edge kept is the model itself
    clean = result["data"]["logit_diff"]["clean"]["mean"]
    assert faith["clean"]["mean"] == pytest.approx(clean, abs=1e-3)
    assert len(faith["random"]) == result["config"].n_random


def test_circuit_file_holds_the_found_heads(result):
    from interplab.circuits import Circuit

    circuit = Circuit.load(result["dir"] / "circuit.json")
    heads = result["data"]["roles"]["circuit_heads"]
    assert heads
    node_heads = sorted(n for n in circuit.nodes if n.startswith("a"))
    expected = sorted(re.sub(r"L(\d+)H(\d+)", r"a\1.h\2", h) for h in heads)
    assert node_heads == expected
    assert circuit.n_edges == result["data"]["faithfulness"]["n_edges"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n": 1}, "at least 2"),
        ({"n": 0}, "n must be a positive integer"),
        ({"copy_k": True}, "copy_k must be a positive integer"),
        ({"path_threshold": -0.1}, "path_threshold must be a number >= 0"),
        ({"copy_z": math.inf}, "copy_z must be finite"),
        ({"attention_threshold": 1.5}, "attention_threshold is an attention probability"),
        ({"split": "test"}, "unknown IOI split 'test'"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(InterplabError, match=re.escape(message)):
        ioi.Config(**overrides)


def test_upstream_heads_are_found_by_path_patching_into_s_inhibition(tmp_path):
    """storyworld-4l's S-inhibition head is in layer 0, so the run above never path patches
    into S-inhibition keys and values; pretend a layer-2 head has that role to run the step."""
    import interplab as il
    from interplab.runs import Report

    config = ioi.Config(fast=True, n=12)
    model = il.load_model(config.model)
    task = il.tasks.ioi(model, n=config.n, seed=config.seed, split=config.split)
    pos = ioi._positions(task)
    acts = ioi._activations(model, task)
    state = {
        "model": model,
        "task": task,
        "pos": pos,
        "attention": ioi._attention(model, acts["clean"], pos),
        "roles": ioi.HeadRoles(s_inhibition=["L2H3"]),
    }
    with start_run("ioi-upstream", config, root=tmp_path) as run:
        ioi._duplicate_step(config, run, Report("t"), state)
    drops = state["into_s_inhibition"]
    assert set(drops) == {"k", "v"}
    n_heads = model.cfg.n_heads
    for mean, sem in drops.values():
        assert mean.shape == (model.cfg.n_layers, n_heads)
        # heads in or after the receiver's layer have no path into it: exactly no effect
        assert torch.all(mean[2:] == 0) and torch.isfinite(sem[:2]).all()
    upstream = state["roles"].upstream
    for label, kind in upstream.items():
        layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", label).groups())
        assert layer < 2 and kind in ("duplicate token", "induction", "other")
        assert max(float(d[0][layer, head]) for d in drops.values()) >= config.path_threshold
    assert (run.dir / "figures" / "into-s-inhibition.png").is_file()
