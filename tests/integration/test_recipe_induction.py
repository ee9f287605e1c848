"""The `induction` and `universality` recipes on bundled organisms (fast settings):
storyworld-4l has induction heads (layer 2) and storyworld-1l-attn, one attention-only layer,
has none; heads found by patching overlap the attention classification; storyworld-4l and its
LayerNorm-free fine-tune share their roles."""

from __future__ import annotations

import json
import math
import re

import pytest

from interplab.config import config_from_args
from interplab.errors import InterplabError
from interplab.recipes import RECIPES, register
from interplab.recipes import induction as induction_recipe
from interplab.recipes import universality as universality_recipe
from interplab.runs import run_recipe

MODEL, CONTROL, NOLN = "storyworld-4l", "storyworld-1l-attn", "storyworld-4l-noln"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    # until the registry lists them (a no-op once it does)
    for name, module in (
        ("induction", "interplab.recipes.induction"),
        ("universality", "interplab.recipes.universality"),
    ):
        if name not in RECIPES:
            register(name, module)


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory, _registered):
    root = tmp_path_factory.mktemp("runs")
    return run_recipe("induction", ["--fast", "--model", MODEL, "--control", CONTROL], root=root)


@pytest.fixture(scope="module")
def universality_run(tmp_path_factory, _registered):
    root = tmp_path_factory.mktemp("runs")
    return run_recipe("universality", ["--fast", "--models", f"{MODEL},{NOLN}"], root=root)


def _lh(label: str) -> tuple[int, int]:
    """(layer, head) of a label 'L2H3'."""
    layer, head = re.fullmatch(r"L(\d+)H(\d+)", label).groups()
    return int(layer), int(head)


def _texts(report: dict) -> str:
    return "\n".join(
        b["text"] for s in report["sections"] for b in s["blocks"] if b["type"] == "text"
    )


def test_induction_heads_in_model_not_in_control(induction_run):
    assert json.loads((induction_run.run_dir / "status.json").read_text())["status"] == "done"
    data = json.loads((induction_run.run_dir / "induction.json").read_text())
    model, control = data["model"], data["control"]
    assert model["name"] == MODEL and control["name"] == CONTROL
    # induction loss gap: several nats with induction heads, ~0 for skip-trigrams only
    assert model["induction_gap"]["mean"] > 1.0
    assert abs(control["induction_gap"]["mean"]) < 0.3
    assert math.isfinite(model["induction_gap"]["sem"]) and model["induction_gap"]["sem"] > 0
    score = model["scores"]["induction"]["mean"]
    heads = [_lh(h) for h in model["roles"]["induction"] if _lh(h)[0] >= 1]
    assert heads, model["roles"]
    assert all(score[layer][h] > 0.3 for layer, h in heads)
    # every head classified 'induction' is one whose score passes the threshold
    for layer, row in enumerate(model["role_grid"]):
        for h, role in enumerate(row):
            assert (role == "induction") == (f"L{layer}H{h}" in model["roles"]["induction"])
    # the control: no induction head by attention or by patching
    assert control["roles"]["induction"] == []
    assert max(max(row) for row in control["scores"]["induction"]["mean"]) < 0.3
    assert control["induction_found"] == [] and not control["readable"]
    assert "No induction head is found in the control" in _texts(
        json.loads((induction_run.run_dir / "report.json").read_text())
    )


def test_patching_agrees_with_attention(induction_run):
    model = json.loads((induction_run.run_dir / "induction.json").read_text())["model"]
    assert model["readable"]
    found, classified = set(model["induction_found"]), set(model["roles"]["induction"])
    assert found & classified, (found, classified)
    agreement = model["agreement"]["induction"]
    assert set(agreement["both"]) == found & classified
    assert agreement["jaccard"] == pytest.approx(len(found & classified) / len(found | classified))
    # K-composition: path patching into the induction heads' keys finds earlier heads that the
    # attention scores call previous-token heads
    assert model["receivers"] and model["k_paths"]
    prev = model["agreement"]["previous-token"]
    assert set(prev["by_patching"]) & set(prev["by_attention"]), prev
    for label in model["previous_found"]:
        assert _lh(label)[0] < max(_lh(r)[0] for r in model["receivers"])
    # the found heads' recovered effects clear the stated threshold
    recovered = model["patching"]["recovered"]
    for label in found:
        layer, head = _lh(label)
        assert abs(recovered[layer][head]) >= induction_run.config.patch_threshold


def test_induction_gap_matches_scorecard(induction_run):
    import interplab as il
    from interplab.data.tasks.scorecard import induction_score

    config = induction_run.config
    data = json.loads((induction_run.run_dir / "induction.json").read_text())
    reference = induction_score(
        il.load_model(CONTROL), n=config.n, seq_len=config.seq_len, seed=config.seed
    )
    assert data["control"]["induction_gap"]["mean"] == pytest.approx(reference.value, abs=1e-5)


def test_induction_report_sections(induction_run):
    report = json.loads((induction_run.run_dir / "report.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    for title in (
        "Induction loss gap",
        "Attention-pattern role scores",
        "Patching: which heads carry induction",
        "K-composition: what feeds the induction heads' keys",
        "Agreement: patching vs attention scores",
        "The top induction head's attention",
    ):
        assert title in titles
    figures = {p.name for p in (induction_run.run_dir / "figures").iterdir()}
    assert {"loss-by-position.png", "top-induction-head-mean.png", "scores-model.png"} <= figures


def test_universality_roles_shared_by_related_models(universality_run):
    data = json.loads((universality_run.run_dir / "universality.json").read_text())
    assert list(data["models"]) == [MODEL, NOLN]
    induction = data["universal"]["induction"]
    assert induction["in_every_model"] and induction["n_models"] == 2
    assert all(layers and min(layers) >= 1 for layers in induction["layers"].values())
    # a LayerNorm-free fine-tune keeps its base model's induction heads in place
    assert induction["same_heads"]
    # chance level of shared heads: per layer, n_heads * prod over models of k_m / n_heads
    n_heads = 4
    for role, universal in data["universal"].items():
        row = data["table"][role]
        expected = 0.0
        for layer in {int(h[1]) for heads in row.values() for h in heads}:
            share = 1.0
            for heads in row.values():
                share *= sum(h.startswith(f"L{layer}H") for h in heads) / n_heads
            expected += n_heads * share
        assert universal["shared_by_chance"] == pytest.approx(expected)
    table = data["table"]
    assert set(table) == {
        "previous-token",
        "induction",
        "duplicate-token",
        "induction (patching)",
        "previous-token (K-composition patching)",
    }
    for role, row in table.items():
        assert set(row) == {MODEL, NOLN}
        assert data["universal"][role]["in_every_model"] == all(row.values())
    assert table["induction"][MODEL] == data["models"][MODEL]["roles"]["induction"]
    text = _texts(json.loads((universality_run.run_dir / "report.json").read_text()))
    assert "Universal (in all 2 models):" in text and "induction" in text
    assert (universality_run.run_dir / "figures" / "roles-grid.png").is_file()


def test_missing_models_name_the_training_command(monkeypatch):
    from interplab.models import organisms

    monkeypatch.setattr(organisms, "organism_names", lambda: [MODEL])
    with pytest.raises(InterplabError, match="interplab train-organism storyworld-2l-seed3"):
        induction_recipe.require_models([MODEL, "storyworld-2l-seed3"])
    monkeypatch.undo()
    with pytest.raises(InterplabError, match="unknown model 'storyworld-9l'"):
        induction_recipe.require_models(["storyworld-9l"])


def test_config_errors_and_list_flags():
    config = config_from_args(universality_recipe.Config, ["--models", f"{MODEL}, {NOLN}"])
    assert config.models == [MODEL, NOLN]
    assert universality_recipe.Config().models == [
        "storyworld-2l-seed1",
        "storyworld-2l-seed2",
        "storyworld-2l-seed3",
        "storyworld-2l-seed4",
        "storyworld-2l",
    ]
    with pytest.raises(InterplabError, match="models must be a non-empty list"):
        universality_recipe.Config(models=[])
    with pytest.raises(InterplabError, match="storyworld-4l repeated"):
        universality_recipe.Config(models=[MODEL, MODEL])
    with pytest.raises(InterplabError, match="n must be an integer >= 2"):
        induction_recipe.Config(n=1)
    with pytest.raises(InterplabError, match=r"induction_threshold must be a number in \(0, 1\]"):
        induction_recipe.Config(induction_threshold=0.0)
    with pytest.raises(InterplabError, match="min_gap"):
        induction_recipe.Config(min_gap=-1.0)


def test_sequence_longer_than_context_is_rejected():
    import interplab as il

    config = induction_recipe.Config(seq_len=70, model=MODEL)
    with pytest.raises(InterplabError, match="seq_len=70 needs 2 \\* 70 \\+ 1 positions"):
        induction_recipe.study_model(il.load_model(CONTROL), CONTROL, config)
