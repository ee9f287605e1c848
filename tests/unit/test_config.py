"""interplab.config: dataclass configs <-> CLI flags, help text and JSON."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from interplab.config import config_from_args, config_help, config_to_dict, field_docs, to_jsonable
from interplab.errors import InterplabError


@dataclass
class Inner:
    k: int = 32
    """Latents kept active per token."""
    aux_k: int | None = None
    """Dead-latent auxiliary width; None = d_in // 2."""


@dataclass
class Base:
    seed: int = 0
    """Random seed."""


@dataclass
class Cfg(Base):
    d_sae: int = 128
    """Number of latents.

    Second paragraph of the docstring.
    """
    lr: float = 3e-4
    """Learning rate."""
    name: str = "run"
    architecture: Literal["relu", "topk", "jumprelu"] = "topk"
    """Dictionary architecture."""
    normalize: bool = True
    """Scale activations to unit mean norm."""
    limit: int | None = None
    """Stop after this many steps; none = no limit."""
    layers: list[int] = field(default_factory=lambda: [0, 1])
    """Layers to train on."""
    shape: tuple[int, int] = (2, 3)
    widths: tuple[float, ...] = (1.0,)
    out: Path = Path("runs")
    """Output folder."""
    sparse: bool | None = None
    inner: Inner = field(default_factory=Inner)
    no_bias: bool = False
    """A field whose own name starts with no_."""
    undocumented: int = 1


@dataclass
class Required:
    d_in: int
    """Input width."""
    hook_name: str
    """Where to read activations."""
    k: int = 4


@dataclass
class Validated:
    k: int = 4
    """Must be positive."""

    def __post_init__(self):
        if self.k <= 0:
            raise InterplabError(f"k must be positive, got {self.k}")


# ----------------------------------------------------------------------------- field_docs


def test_field_docs_reads_docstrings_under_fields_including_inherited():
    docs = field_docs(Cfg)
    assert docs["seed"] == "Random seed."  # inherited from Base
    assert docs["lr"] == "Learning rate."
    assert docs["d_sae"] == "Number of latents.\n\nSecond paragraph of the docstring."
    assert docs["name"] == ""  # next statement is another field, not a docstring
    assert docs["undocumented"] == ""
    assert list(docs) == [f.name for f in dataclasses.fields(Cfg)]


def test_field_docs_without_source_is_empty():
    namespace: dict = {}
    exec(  # a class with no source file, as in a REPL
        "from dataclasses import dataclass\n@dataclass\nclass C:\n    x: int = 1\n    'doc'\n",
        namespace,
    )
    assert field_docs(namespace["C"]) == {"x": ""}


def test_field_docs_rejects_non_dataclass():
    with pytest.raises(InterplabError, match="expected a dataclass type"):
        field_docs(int)


# ----------------------------------------------------------------------------- coercion


def test_defaults_when_no_args():
    assert config_from_args(Cfg, []) == Cfg()
    assert config_from_args(Cfg, None) == Cfg()


@pytest.mark.parametrize(
    ("args", "attr", "expected"),
    [
        (["--d-sae", "4096"], "d_sae", 4096),
        (["--d_sae=4096"], "d_sae", 4096),
        (["--d-sae", "2e3"], "d_sae", 2000),  # integral float notation is accepted for ints
        (["--seed", "-3"], "seed", -3),  # negative numbers are values, not flags
        (["--lr", "1e-3"], "lr", 1e-3),
        (["--lr=2"], "lr", 2.0),
        (["--name", "my run"], "name", "my run"),
        (["--name", "none"], "name", "none"),  # plain str fields keep the word
        (["--architecture", "relu"], "architecture", "relu"),
        (["--normalize"], "normalize", True),
        (["--no-normalize"], "normalize", False),
        (["--no_normalize"], "normalize", False),
        (["--normalize=false"], "normalize", False),
        (["--normalize", "no"], "normalize", False),
        (["--normalize", "TRUE"], "normalize", True),
        (["--limit", "none"], "limit", None),
        (["--limit", "None"], "limit", None),
        (["--limit", "10"], "limit", 10),
        (["--layers", "3,4, 5"], "layers", [3, 4, 5]),
        (["--layers", "[1,2]"], "layers", [1, 2]),
        (["--layers="], "layers", []),
        (["--shape", "4,5"], "shape", (4, 5)),
        (["--widths", "0.5,2"], "widths", (0.5, 2.0)),
        (["--out", "/tmp/x"], "out", Path("/tmp/x")),
        (["--sparse"], "sparse", True),
        (["--sparse=none"], "sparse", None),
        (["--sparse", "none"], "sparse", None),
        (["--inner.k", "8"], "inner", Inner(k=8)),
        (["--inner.aux-k=16"], "inner", Inner(aux_k=16)),
        (["--no-bias"], "no_bias", True),  # the field itself wins over the --no- form
    ],
)
def test_coercion(args, attr, expected):
    value = getattr(config_from_args(Cfg, args), attr)
    assert value == expected
    assert type(value) is type(expected)


def test_many_flags_together_and_last_wins():
    cfg = config_from_args(
        Cfg, ["--normalize", "--lr", "0.1", "--no-normalize", "--seed", "1", "--seed", "2"]
    )
    assert (cfg.normalize, cfg.lr, cfg.seed) == (False, 0.1, 2)


def test_bool_flag_does_not_swallow_a_following_flag_or_value():
    cfg = config_from_args(Cfg, ["--normalize", "--d-sae", "7"])
    assert cfg.normalize is True and cfg.d_sae == 7
    with pytest.raises(InterplabError, match="unexpected argument '7'"):
        config_from_args(Cfg, ["--normalize", "7"])


def test_dict_args_parse_strings_and_check_typed_values():
    cfg = config_from_args(Cfg, {"d-sae": "64", "lr": 1, "layers": [5], "normalize": False})
    assert (cfg.d_sae, cfg.lr, cfg.layers, cfg.normalize) == (64, 1.0, [5], False)
    assert type(cfg.lr) is float
    assert config_from_args(Cfg, {"inner.k": 3, "limit": None}).inner.k == 3
    with pytest.raises(InterplabError, match="invalid value 1.5 for --d-sae: expected int"):
        config_from_args(Cfg, {"d_sae": 1.5})
    with pytest.raises(InterplabError, match="expected bool"):
        config_from_args(Cfg, {"normalize": 1})


def test_base_config_supplies_unset_values():
    base = Cfg(d_sae=7, inner=Inner(k=2, aux_k=5))
    cfg = config_from_args(Cfg, ["--inner.k", "9"], base=base)
    assert cfg.d_sae == 7 and cfg.inner == Inner(k=9, aux_k=5)
    with pytest.raises(InterplabError, match="base config must be a Cfg"):
        config_from_args(Cfg, [], base=Inner())


def test_required_fields():
    cfg = config_from_args(Required, ["--d-in", "16", "--hook-name", "blocks.0.hook_resid_post"])
    assert cfg == Required(d_in=16, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(
        InterplabError, match=r"missing required flag\(s\).*--d-in \(int\), --hook-name \(str\)"
    ):
        config_from_args(Required, [])


def test_post_init_validation_still_runs():
    with pytest.raises(InterplabError, match="k must be positive, got -1"):
        config_from_args(Validated, ["--k", "-1"])


def test_works_with_classes_defined_in_functions():
    @dataclass
    class Local:
        width: int = 3
        """Local width."""
        mode: Literal["x", "y"] = "x"

    assert config_from_args(Local, ["--width", "5", "--mode", "y"]) == Local(width=5, mode="y")
    assert field_docs(Local) == {"width": "Local width.", "mode": ""}


# ----------------------------------------------------------------------------- errors


def test_unknown_flag_suggests_closest():
    with pytest.raises(InterplabError, match=r"unknown flag '--d-sea'.*Did you mean: --d-sae"):
        config_from_args(Cfg, ["--d_sea", "4096"])
    with pytest.raises(InterplabError, match=r"unknown flag '--normalise'.*--normalize"):
        config_from_args(Cfg, {"normalise": "true"})


def test_no_prefix_only_for_bool_fields():
    with pytest.raises(InterplabError, match="unknown flag '--no-lr'"):
        config_from_args(Cfg, ["--no-lr"])
    with pytest.raises(InterplabError, match="--no-normalize takes no value"):
        config_from_args(Cfg, ["--no-normalize=true"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--d-sae", "abc"], "invalid value 'abc' for --d-sae: expected int"),
        (["--d-sae", "1.5"], "invalid value '1.5' for --d-sae: expected int"),
        (["--d-sae", "none"], "invalid value 'none' for --d-sae: expected int"),
        (["--lr", "fast"], "invalid value 'fast' for --lr: expected float"),
        (["--normalize=maybe"], "invalid value 'maybe' for --normalize: expected bool"),
        (["--limit", "x"], r"invalid value 'x' for --limit: expected int\|none"),
        (
            ["--architecture", "gated"],
            "invalid value 'gated' for --architecture: expected one of: relu, topk, jumprelu",
        ),
        (["--layers", "1,x"], r"invalid value '1,x' for --layers: expected int,int,\.\.\."),
        (["--shape", "1,2,3"], "invalid value '1,2,3' for --shape: expected int,int"),
        (["--out="], "invalid value '' for --out: expected path"),
        (["--sparse=2"], r"invalid value '2' for --sparse: expected bool\|none"),
    ],
)
def test_bad_values_name_field_value_and_type(args, message):
    with pytest.raises(InterplabError, match=message):
        config_from_args(Cfg, args)


def test_flag_without_value_and_positional_argument():
    with pytest.raises(InterplabError, match=r"flag --d-sae needs a value \(int\)"):
        config_from_args(Cfg, ["--d-sae"])
    with pytest.raises(InterplabError, match="unexpected argument 'topk'"):
        config_from_args(Cfg, ["topk"])
    with pytest.raises(InterplabError, match="expected a list of arguments or a dict"):
        config_from_args(Cfg, "--d-sae 3")


def test_unsupported_annotation_is_reported():
    @dataclass
    class WithDict:
        table: dict[str, int] = field(default_factory=dict)

    assert config_from_args(WithDict, []) == WithDict()
    with pytest.raises(
        InterplabError, match="--table has type .*cannot be set from the command line"
    ):
        config_from_args(WithDict, ["--table", "a=1"])


# ----------------------------------------------------------------------------- help


def test_config_help_lists_flags_types_defaults_and_docs():
    text = config_help(Cfg)
    lines = text.splitlines()
    flag_lines = [line.split()[0] for line in lines if line.startswith("  --")]
    assert flag_lines == [
        "--seed", "--d-sae", "--lr", "--name", "--architecture", "--[no-]normalize", "--limit",
        "--layers", "--shape", "--widths", "--out", "--[no-]sparse", "--inner.k", "--inner.aux-k",
        "--[no-]no-bias", "--undocumented",
    ]  # fmt: skip
    line = next(x for x in lines if x.startswith("  --d-sae"))
    assert "int" in line and "default: 128" in line
    assert "Number of latents. Second paragraph" in text
    assert (
        next(x for x in lines if x.startswith("  --architecture")).split()[1]
        == "{relu,topk,jumprelu}"
    )
    assert "default: none" in next(x for x in lines if x.startswith("  --limit"))
    assert "default: 0,1" in next(x for x in lines if x.startswith("  --layers"))
    assert "Latents kept active per token." in text  # nested field docs
    assert all(len(x) <= 88 for x in lines)
    assert "required" in next(x for x in config_help(Required).splitlines() if "--d-in" in x)


# ----------------------------------------------------------------------------- JSON


class Color(enum.Enum):
    RED = "red"


def test_config_to_dict_round_trips_through_json():
    cfg = Cfg(layers=[3], shape=(1, 2), out=Path("a/b"))
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["out"] == "a/b" and d["shape"] == [1, 2] and d["inner"] == {"k": 32, "aux_k": None}
    # the dict feeds straight back into config_from_args
    assert config_from_args(Cfg, d) == cfg
    with pytest.raises(InterplabError, match="expected a dataclass instance or a dict"):
        config_to_dict(Cfg)


def test_to_jsonable_numpy_torch_and_friends():
    obj = {
        "np_f": np.float32(0.5),
        "np_i": np.int64(3),
        "np_b": np.bool_(True),
        "arr": np.arange(3),
        "t0": torch.tensor(2.5),
        "t": torch.tensor([[1, 2]]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "path": Path("x"),
        "enum": Color.RED,
        "set": {3, 1},
        1: "int key",
    }
    out = to_jsonable(obj)
    assert out == {
        "np_f": 0.5, "np_i": 3, "np_b": True, "arr": [0, 1, 2], "t0": 2.5, "t": [[1, 2]],
        "dtype": "bfloat16", "device": "cpu", "path": "x", "enum": "red", "set": [1, 3],
        "1": "int key",
    }  # fmt: skip
    assert type(out["np_i"]) is int and type(out["np_b"]) is bool
    json.dumps(out)
    with pytest.raises(TypeError, match="cannot convert object"):
        to_jsonable(object())
