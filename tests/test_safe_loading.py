"""One safe loader behind every command that reads a ``.pth`` file (eval, predict, train --resume, convert).

A reference-style training file (state dict under ``model`` plus the training arguments as an
``argparse.Namespace`` and NumPy scalars) is accepted everywhere; a file whose unpickling would
run code is refused everywhere, with the same message, and the code never runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import make_image_folder, one_thread, run_cli, train_flags  # noqa: F401

pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

from transnext.checkpoints import CheckpointError, safe_torch_load  # noqa: E402


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("safe")
    torch.manual_seed(0)
    from transnext import create_model

    sd = create_model("transnext_micro", num_classes=3).state_dict()
    ref = d / "reference_style.pth"
    torch.save({
        "model": sd, "optimizer": {}, "epoch": np.int64(299), "max_accuracy": np.float64(82.5),
        "args": argparse.Namespace(model="transnext_micro", lr=1e-3, input_size=224, drop_path=0.15),
    }, ref)
    marker = d / "code_ran"
    evil = d / "evil.pth"
    torch.save({"model": sd, "args": _RunsCode(marker)}, evil)
    images = make_image_folder(d / "imgs", classes=3, per_class=1, splits=("val",))
    return dict(ref=ref, evil=evil, marker=marker, images=images / "val", sd=sd, dir=d)


REFUSED = "refused to load: unpickling the file needs the Python object"


def test_loader_reads_reference_metadata(files):
    obj = safe_torch_load(files["ref"])
    assert obj["args"].input_size == 224 and obj["max_accuracy"] == 82.5 and isinstance(obj["epoch"], np.integer)
    with pytest.raises(CheckpointError, match=REFUSED + r" '\w+'.*can execute code"):
        safe_torch_load(files["evil"])
    assert not files["marker"].exists()


def test_eval_checkpoint(files):
    common = ["--model", "transnext_micro", "--img-size", "32", "--batch-size", "4", "--no-progress", "--num-workers", "0"]
    r = run_cli("eval", str(files["images"]), "--checkpoint", str(files["ref"]), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| folder |" in r.stdout and "| 3 |" in r.stdout
    r = run_cli("eval", str(files["images"]), "--checkpoint", str(files["evil"]), *common)
    assert r.returncode == 1 and REFUSED in r.stderr and "Traceback" not in r.stderr
    assert not files["marker"].exists()


def test_predict(files):
    common = ["--model", "transnext_micro", "--img-size", "32", "--json"]
    r = run_cli("predict", str(files["images"]), "--checkpoint", str(files["ref"]), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"path"') == 3
    r = run_cli("predict", str(files["images"]), "--checkpoint", str(files["evil"]), *common)
    assert r.returncode == 1 and REFUSED in r.stderr
    assert not files["marker"].exists()


def test_train_resume(files, tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, val_per_class=1)
    flags = train_flags(data_dir=str(data), output=str(tmp_path / "run"))
    # a weights file is not a resumable run: the answer says so (it is read, not refused as unsafe)
    r = run_cli("train", *flags, "--resume", str(files["ref"]))
    assert r.returncode == 1 and "not a transnext training checkpoint" in r.stderr and "--initial-checkpoint" in r.stderr
    r = run_cli("train", *flags, "--resume", str(files["evil"]))
    assert r.returncode == 1 and REFUSED in r.stderr
    r = run_cli("train", *flags, "--initial-checkpoint", str(files["evil"]))
    assert r.returncode == 1 and REFUSED in r.stderr
    assert not files["marker"].exists()


def test_convert(files, tmp_path):
    out = tmp_path / "ref.safetensors"
    r = run_cli("convert", str(files["ref"]), str(out), "--variant", "transnext_micro")
    assert r.returncode == 0, r.stderr[-2000:]
    from transnext.checkpoints import load_state_dict

    got = load_state_dict(out)
    assert got.keys() == files["sd"].keys() and all(torch.equal(got[k], v) for k, v in files["sd"].items())
    r = run_cli("convert", str(files["evil"]), str(tmp_path / "evil.safetensors"))
    assert r.returncode == 1 and REFUSED in r.stderr and not (tmp_path / "evil.safetensors").exists()
    assert not files["marker"].exists()
