"""The `interplab` command: help at every level, cheap imports, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from interplab.cli import app
from tests.conftest import make_hf_model, make_tokenizer

runner = CliRunner()


def test_help_does_not_import_torch():
    code = "import sys, interplab, interplab.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "command", [[], ["models"], ["info"], ["cache"], ["scorecard"], ["train-organism"], ["demo"]]
)
def test_help_at_every_level(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_run_lists_recipes():
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 0 and "demo" in result.output


def test_errors_are_one_line_with_status_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "interplab", "info", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "config.json" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    make_hf_model("gpt2").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_info_lists_hooks(model_dir):
    result = runner.invoke(app, ["info", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.hook_z" in result.output and "d_model" in result.output


def test_cache_command_writes_a_cache(model_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    out = tmp_path / "cache"
    args = [
        "cache",
        str(model_dir),
        "--hook",
        "blocks.1.hook_resid_post",
        "--hook",
        "blocks.0.mlp.hook_post",
        "--corpus",
        str(text),
        "--tokens",
        "500",
        "--out",
        str(out),
        "--context-size",
        "32",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_tokens"] == 500 and set(manifest["hooks"]) == {
        "blocks.1.hook_resid_post",
        "blocks.0.mlp.hook_post",
    }
