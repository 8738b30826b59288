"""The native kernel's build cache: warnings where it cannot run, trust checks on the cache
directory and files, the ABI check, damaged caches rebuilt (each in a subprocess, so a crash
shows as its exit code) and a build key that does not depend on the host."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from transnext.cli.main import main
from transnext.ops import native

TESTS = Path(__file__).parent

# Runs the op in float64 through the torch backend (the native kernel where it loads) and the
# reference backend; prints the kernel's status, the warnings and the largest difference.
SCRIPT = r"""
import importlib, json, sys, warnings
import torch
sys.path.insert(0, TESTS)
from test_ops import aa_inputs, run_aa
from transnext.ops import native
blocked_only = importlib.import_module("transnext.ops").policy(whole_logits_bytes=0)  # always the blocked kernel
blocked_only.__enter__()  # kept referenced: a collected context manager would undo the budget
calls = []
real = native.aggregated_attention_forward
native.aggregated_attention_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t, extra = aa_inputs(1, 2, (5, 7), 8, (2, 3))
    ref, _ = run_aa("reference", t, extra)
    with torch.no_grad():
        out, _ = run_aa("torch", {k: v.detach() for k, v in t.items()}, extra)
        out32, _ = run_aa("torch", {k: v.detach().float() for k, v in t.items()}, extra) if FLOAT32 else (out, None)
print(json.dumps({
    "status": native.status(torch.float64), "native_calls": len(calls),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, native.NativeKernelWarning)],
    "err": float((out - ref).abs().max()), "err32": float((out32.double() - ref).abs().max()),
}))
"""


def _run(cache: Path | None, float32: bool = False, **env: str | None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in (native.ENV_VAR, "CC")}
    environ["TRANSNEXT_CACHE_DIR"] = str(cache)
    for k, v in env.items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    code = f"TESTS = {str(TESTS)!r}\nFLOAT32 = {float32}\n" + SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-10, result
    return result


needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A cache with a valid float64 build (built once for the module, copied by each test)."""
    cache = tmp_path_factory.mktemp("seed")
    result = _run(cache)
    assert result["status"]["state"] == "loaded" and result["status"]["origin"] == "built", result
    return cache


def _copy(seeded: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(seeded, cache)
    (record,) = (cache / "native").glob("aggregated_attention_double_*.json")
    return cache, record, cache / "native" / json.loads(record.read_text())["library"]


def _forge_record(record: Path, library: Path) -> None:
    """Rewrite the record so that it vouches for ``library`` (as if that were what was built)."""
    r = json.loads(record.read_text())
    r["size"] = library.stat().st_size
    r["sha256"] = native._sha256(library)
    record.write_text(json.dumps(r))


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """The module's state as in a new process, with the cache in a temporary directory."""
    for name, value in (("_libs", {}), ("_errors", {}), ("_info", {}), ("_warned", set()), ("_private_dir", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setenv("TRANSNEXT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    return tmp_path / "cache"


# -- 1. never silent -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["CC", "PATH"])
def test_missing_compiler_warns_once_with_reason_and_fix(tmp_path, how) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"CC": str(tmp_path / "no-such-cc")} if how == "CC" else {"PATH": str(empty)}
    result = _run(tmp_path / "cache", float32=True, **env)  # both element types tried: still one warning
    assert result["status"]["state"] == "unavailable" and result["native_calls"] == 0
    assert len(result["warnings"]) == 1, result["warnings"]
    (message,) = result["warnings"]
    assert "no C compiler found" in message
    assert "install a C compiler" in message and "TRANSNEXT_NATIVE=0" in message and "torch kernels run" in message
    assert result["err32"] < 1e-4


def test_switched_off_gives_no_warning(fresh_state, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(native.ENV_VAR, "0")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available(torch.float64)
        assert native.status()["state"] == "off"
    assert caught == []
    assert not fresh_state.exists()  # nothing was built or even tried


def test_info_shows_native_status(fresh_state, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert main(["info", "transnext_tiny"]) == 0
    assert re.search(r"^native kernel: not available \(no C compiler found .*\)", capsys.readouterr().out, re.M)
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert main(["info", "transnext_tiny"]) == 0
    assert "native kernel: off (TRANSNEXT_NATIVE=0)" in capsys.readouterr().out


@needs_cc
def test_info_shows_level_and_location(fresh_state, monkeypatch, capsys) -> None:
    native._info[torch.float32] = {"path": "/x/lib.so", "isa": "x86-64-v3", "origin": "cache"}
    native._libs[torch.float32] = object()  # as loaded: no build for this line
    assert main(["info", "transnext_tiny"]) == 0
    assert "native kernel: x86-64-v3, cache, loaded from /x/lib.so" in capsys.readouterr().out


# -- 2. trust --------------------------------------------------------------------------------------------------

@needs_cc
def test_cache_dir_is_created_private(fresh_state) -> None:
    assert native._library_dir() == fresh_state / "native"
    assert (fresh_state / "native").stat().st_mode & 0o777 == 0o700


@needs_cc
def test_world_writable_cache_dir_is_not_used(seeded, tmp_path) -> None:
    cache, _, library = _copy(seeded, tmp_path)
    (cache / "native").chmod(0o777)
    result = _run(cache)
    assert result["status"]["state"] == "loaded" and result["native_calls"] > 0
    assert not result["status"]["path"].startswith(str(cache)), "loaded from a directory others can write"
    assert any("writable by group and others" in w and "chmod 700" in w for w in result["warnings"]), result["warnings"]


@needs_cc
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_library_owned_by_another_uid_is_rebuilt(seeded, tmp_path) -> None:
    cache, _, library = _copy(seeded, tmp_path)
    os.chown(library, 12345, 12345)
    result = _run(cache)
    assert result["status"]["state"] == "loaded" and result["native_calls"] > 0
    assert any("owned by uid 12345" in w for w in result["warnings"]), result["warnings"]
    loaded = Path(result["status"]["path"])
    assert loaded.parent == cache / "native"
    assert all(p.stat().st_uid == os.getuid() for p in (cache / "native").iterdir())


# -- 3. ABI ----------------------------------------------------------------------------------------------------

def _c_prototypes() -> dict[str, list[str]]:
    source = native._SOURCE.read_text()
    found = {}
    for m in re.finditer(r"^int (transnext_\w+)\(([^)]*)\)", source, re.M):
        params = [p.strip() for p in m.group(2).split(",") if p.strip() and p.strip() != "void"]
        found[m.group(1)] = params
    return found


def test_ctypes_table_mirrors_the_c_prototypes() -> None:
    protos = _c_prototypes()
    assert set(protos) == set(native.PROTOTYPES)
    for name, params in protos.items():
        expected = [native._PTR if "*" in p else native._I64 for p in params]
        assert list(native.PROTOTYPES[name][1]) == expected, name
    m = re.search(r"#define TRANSNEXT_NATIVE_ABI (\d+)", native._SOURCE.read_text())
    assert m and int(m.group(1)) == native.ABI_VERSION


@needs_cc
@pytest.mark.parametrize("variant", ["other-abi", "no-abi-symbol"])
def test_stale_library_with_other_abi_is_rebuilt(seeded, tmp_path, variant) -> None:
    cache, record, library = _copy(seeded, tmp_path)
    source = native._SOURCE.read_text()
    if variant == "other-abi":
        source = re.sub(r"#define TRANSNEXT_NATIVE_ABI \d+", "#define TRANSNEXT_NATIVE_ABI 999", source)
    else:  # an older revision, before the symbol
        source = re.sub(r"int transnext_native_abi_version\(void\).*\n", "", source)
    stale = tmp_path / "stale.c"
    stale.write_text(source)
    subprocess.run([os.environ.get("CC") or "cc", "-O0", "-DREAL=double", "-DREAL_IS_DOUBLE", "-fPIC", "-shared",
                    "-o", str(library), str(stale), "-lm"], check=True, timeout=300)
    _forge_record(record, library)  # the record agrees: only the check after loading can tell
    result = _run(cache)
    assert result["status"]["state"] == "loaded" and result["native_calls"] > 0
    assert result["status"]["origin"].startswith("rebuilt")
    assert ("ABI 999" if variant == "other-abi" else "lacks transnext_native_abi_version") in result["status"]["origin"]


# -- 4. damaged caches -----------------------------------------------------------------------------------------

@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "no-symbols"])
def test_damaged_cache_is_rebuilt(seeded, tmp_path, damage) -> None:
    cache, record, library = _copy(seeded, tmp_path)
    data = library.read_bytes()
    if damage == "truncated":  # mapped beyond its end, this took the process down with SIGBUS
        library.write_bytes(data[: len(data) // 3])
    elif damage == "random":
        library.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        library.write_bytes(b"")
    else:
        other = tmp_path / "other.c"
        other.write_text("int something_else(void) { return 1; }\n")
        subprocess.run([os.environ.get("CC") or "cc", "-fPIC", "-shared", "-o", str(library), str(other)], check=True,
                       timeout=120)
        _forge_record(record, library)
    result = _run(cache)
    assert result["status"]["state"] == "loaded" and result["native_calls"] > 0
    assert result["status"]["origin"].startswith("rebuilt"), result["status"]
    assert Path(result["status"]["path"]).parent == cache / "native"
    assert len(result["warnings"]) == 1 and "rebuilt" in result["warnings"][0]
    # the damaged file is replaced (same build, same name) or gone: the next process loads the new one
    assert not library.exists() or native._sha256(library) == json.loads(record.read_text())["sha256"]
    assert _run(cache)["status"]["origin"] == "cache"


# -- 5. build identity -----------------------------------------------------------------------------------------

@needs_cc
def test_build_key_ignores_the_host_and_follows_the_source(monkeypatch) -> None:
    cc = tuple(native._compiler())
    isa, flags = native._targets(cc)[0]
    args = ["-DREAL=double", *flags, *native._COMMON_FLAGS]
    source = native._SOURCE.read_bytes()
    key = native._build_key(cc, args, source)
    monkeypatch.setattr(socket, "gethostname", lambda: "another-node")
    monkeypatch.setattr("platform.node", lambda: "another-node")
    assert native._build_key(cc, args, source) == key
    assert native._build_key(cc, args, source + b"\n") != key
    assert native._build_key(cc, [*args, "-DXBAND=8"], source) != key
    assert "-ffp-contract=fast" in args


@needs_cc
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 levels")
def test_x86_build_targets_a_named_level() -> None:
    isa, flags = native._targets(tuple(native._compiler()))[0]
    assert re.fullmatch(r"x86-64-v[234]", isa) and flags == [f"-march={isa}"]
