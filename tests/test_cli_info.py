"""``transnext info`` and ``transnext convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import transnext
from conftest import fill_deterministic
from transnext.checkpoints import load_state_dict
from transnext.cli.main import main
from transnext.models import TransNeXt


def test_info_lists_every_published_checkpoint(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("transnext_")}
    assert set(lines) == set(transnext.list_pretrained())
    assert lines["transnext_tiny.in1k"][1:5] == ["224", "28.2", "5.7", "84.0"]
    assert lines["transnext_base.in1k_384"][1:5] == ["384", "89.7", "56.3", "86.2"]
    assert lines["transnext_micro_aaaa.in1k"][1:5] == ["256", "13.1", "3.3", "82.6"]
    assert "DaiShiResearch/transnext-small-224-1k" in out


def test_info_json_robustness_and_filter(capsys) -> None:
    assert main(["info", "transnext_small", "--robustness", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["transnext_small.in1k", "transnext_small.in1k_384"]
    assert rows[0]["robustness"] == {"imagenet_a": 47.1, "imagenet_r": 52.5, "imagenet_sketch": 39.7,
                                     "imagenet_v2": 74.8, "imagenet_c_mce": 43.9}
    # the 384 fine-tune: every figure the reference publishes for it (it publishes no ImageNet-C mCE)
    assert rows[1]["robustness"] == {"imagenet_a": 58.3, "imagenet_r": 56.4, "imagenet_sketch": 43.2, "imagenet_v2": 76.8}
    assert rows[1]["gflops"] == 32.1


def test_info_robustness_of_the_384_models(capsys) -> None:
    assert main(["info", "transnext_base.in1k_384", "--robustness", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["robustness"] == {"imagenet_a": 61.6, "imagenet_r": 57.7, "imagenet_sketch": 44.7, "imagenet_v2": 77.0}


def test_info_measure_markdown(capsys) -> None:
    assert main(["info", "transnext_micro.in1k", "--measure", "--format", "markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| model | res | params (M) | GFLOPs | top-1 | measured params (M) | measured GFLOPs |")
    assert out[2].startswith("| transnext_micro.in1k | 224 | 12.8 | 2.7 | 82.5 | 12.81 | 2.65 |")


def test_info_unknown_name(capsys) -> None:
    assert main(["info", "transnext_smal"]) == 1
    assert "unknown model 'transnext_smal'; did you mean 'transnext_small'" in capsys.readouterr().err


def _write_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    model = TransNeXt(img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), num_classes=3)
    fill_deterministic(model)
    sd = model.state_dict()
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7}, path)
    return sd


def test_convert_round_trip(tmp_path: Path, capsys) -> None:
    sd = _write_checkpoint(tmp_path / "ckpt.pth")
    assert main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "ckpt.safetensors")]) == 0
    assert f"wrote {tmp_path / 'ckpt.safetensors'} ({len(sd)} tensors" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    # Existing output is kept unless --force.
    assert main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "back.pth")]) == 1
    assert "back.pth exists; pass --force" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "back.pth"), "--force"]) == 0


def test_convert_checks_variant(tmp_path: Path, capsys) -> None:
    _write_checkpoint(tmp_path / "small.pth")
    with pytest.warns(UserWarning, match=r"classifier has shape \(3, 64\), the model's \(3, 384\)"):
        code = main(["convert", str(tmp_path / "small.pth"), str(tmp_path / "out.safetensors"), "--variant", "transnext_micro"])
    assert code == 1
    err = capsys.readouterr().err
    assert "small.pth does not fit TransNeXt" in err and "shape mismatches" in err
    assert not (tmp_path / "out.safetensors").exists()
    micro = transnext.create_model("transnext_micro", num_classes=0)
    torch.save(micro.state_dict(), tmp_path / "micro.pth")
    assert main(["convert", str(tmp_path / "micro.pth"), str(tmp_path / "micro.safetensors"), "--variant", "transnext_micro"]) == 0
    assert "loads into transnext_micro" in capsys.readouterr().out
    assert set(load_state_dict(tmp_path / "micro.safetensors")) == set(micro.state_dict())


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage"])
def test_convert_bad_input_file(tmp_path: Path, capsys, content: bytes) -> None:
    (tmp_path / "bad.pth").write_bytes(content)
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "transnext convert: error:" in err and "bad.pth" in err
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_every_subcommand_has_debug() -> None:
    """``--debug`` (tracebacks instead of one-line errors) is accepted by every subcommand."""
    import argparse

    from transnext.cli.main import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    missing = [name for name, p in sub.choices.items() if "--debug" not in p._option_string_actions]
    assert missing == []


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    # without --debug: one line and exit status 1; with it: the exception itself
    assert main(["info", "transnext_smal"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model 'transnext_smal'"):
        main(["info", "transnext_smal", "--debug"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"), "--debug"])


def test_distribution_name_is_not_the_unrelated_transnext() -> None:
    """pyproject, the version lookup and the install instructions use the same distribution name."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    assert project["name"] == transnext.DIST_NAME == "transnext-pytorch"
    assert any(dep.startswith("transnext-pytorch[") for dep in project["optional-dependencies"]["dev"])
    assert project["scripts"]["transnext"] == "transnext.cli.main:main"  # the command and import name stay
    readme = (repo / "README.md").read_text()
    assert "pip install transnext-pytorch" in readme and "pip install -e ." in readme
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert transnext.__version__ == version("transnext-pytorch")
    except PackageNotFoundError:  # a source tree on the path, not installed under that name
        assert transnext.__version__ == "0+unknown"
