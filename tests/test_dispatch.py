"""The one routing decision: ordered implementations with their reasons, the budgets of
KernelPolicy and ops.policy, the graph-capture mode, the decisions per layer, and the import
layering of transnext.ops."""

from __future__ import annotations

import ast
import dataclasses
import threading
from pathlib import Path

import pytest
import torch

import transnext
from transnext import ops
from transnext.ops import dispatch

OPS_DIR = Path(ops.__file__).parent

# Each module of transnext.ops in its layer; a module imports only from its own layer or below.
LAYERS = {
    "_common": 0,
    "native": 1, "bias": 1, "bias_mlp": 1, "reference": 1, "torch_backend": 1, "blocked": 1, "triton_backend": 1,
    "conv_glu": 1, "pooling": 1,
    "compiled": 2,
    "dispatch": 3,
    "__init__": 4,
}


def _ops_imports(path: Path, subpackage: bool = False) -> set[str]:
    """Names of the transnext.ops modules ``path`` imports (relative or absolute imports);
    ``subpackage``: the file is the ``__init__`` of a package inside transnext.ops (native)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("transnext.ops."))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module or "").startswith("transnext.ops"):
                continue
            rest = node.module[len("transnext.ops"):].lstrip(".")
        elif subpackage and node.level == 1:
            rest = "native." + node.module if node.module else "native"
        else:
            rest = node.module or ""
        if rest:
            found.add(rest.split(".")[0])
        else:  # from . import a, b (or from transnext.ops import a)
            found.update(a.name for a in node.names)
    return found


def _module_files() -> dict[str, Path]:
    files = {p.stem: p for p in OPS_DIR.glob("*.py")}
    files["native"] = OPS_DIR / "native" / "__init__.py"
    return files


def test_every_ops_module_has_a_layer() -> None:
    assert set(_module_files()) == set(LAYERS), "a new ops module needs its place in LAYERS"


def test_ops_imports_follow_the_layering_without_cycles() -> None:
    """Helpers <- kernels <- custom-op wrappers <- dispatch <- transnext.ops: no kernel imports
    dispatch or compiled, no module imports a layer above it, and the import graph has no cycle."""
    graph = {name: _ops_imports(path, subpackage=name == "native") - {name} for name, path in _module_files().items()}
    violations = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
                  for a, deps in graph.items() for b in deps if b in LAYERS and LAYERS[b] > LAYERS[a]]
    assert not violations, violations
    for kernel in [m for m, layer in LAYERS.items() if layer == 1]:
        assert not graph[kernel] & {"dispatch", "compiled"}, kernel
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep in graph:
                visit(dep, [*path, node])
        seen[node] = 2

    for name in graph:
        visit(name, [])


def test_layering_check_sees_a_violation(tmp_path) -> None:
    """The import parser finds relative imports of every form (so the test above can fail)."""
    f = tmp_path / "kernel.py"
    f.write_text("from . import compiled, native\nfrom .dispatch import select_implementation\n"
                 "from ._common import cast\nimport transnext.ops.pooling\n")
    assert _ops_imports(f) == {"compiled", "native", "dispatch", "_common", "pooling"}


# ------------------------------------------------------------------------------ policy
def test_policy_changes_budgets_for_a_block_only() -> None:
    default = ops.current_policy()
    assert default == ops.KernelPolicy()
    with ops.policy(whole_logits_bytes=0, block_elements=7) as p:
        assert ops.current_policy() is p and p.whole_logits_bytes == 0 and p.block_elements == 7
        with ops.policy(block_elements=9):
            assert ops.current_policy().block_elements == 9 and ops.current_policy().whole_logits_bytes == 0
        assert ops.current_policy().block_elements == 7
    assert ops.current_policy() == default
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.block_elements = 1


def test_policy_is_local_to_a_thread() -> None:
    seen = []
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen.append(ops.current_policy().whole_logits_bytes)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with ops.policy(whole_logits_bytes=1):
        inside.set()
        done.wait(10)
    t.join()
    assert seen == [ops.KernelPolicy().whole_logits_bytes]


def test_policy_rejects_unknown_names_and_bad_values() -> None:
    with pytest.raises(TypeError, match="unknown kernel budget.*whole_logit_bytes.*expected some of.*whole_logits_bytes"):
        with ops.policy(whole_logit_bytes=0):
            pass
    with pytest.raises(ValueError, match="block_elements must be an integer >= 1, got 0"):
        ops.KernelPolicy(block_elements=0)
    with pytest.raises(ValueError, match="whole_logits_bytes must be an integer >= 0, got -1"):
        with ops.policy(whole_logits_bytes=-1):
            pass
    with pytest.raises(ValueError, match="got 1.5"):
        ops.KernelPolicy(min_chunk_tokens=1.5)


# ------------------------------------------------------------------------------ choices
def _aa(**kw) -> ops.AttentionProblem:
    base = dict(op="aggregated_attention", backend="torch", device="cpu", dtype=torch.float32, grad=False,
                capture="eager", autocast=False, dropout=False, batch=1, heads=2, tokens=64, keys=16, head_dim=8,
                window=3)
    return ops.AttentionProblem(**{**base, **kw})


def _native_or_torch() -> str:
    return "blocked_native" if dispatch._native_ready(torch.float32, 8, 3) is None else "blocked_torch"


def test_aggregated_attention_choices_in_order() -> None:
    sel = dispatch.select_implementation
    assert sel(_aa()).impl == "whole"
    assert sel(_aa(factored_bias=True)).impl == _native_or_torch()
    big = sel(_aa(batch=4096))
    assert big.impl == _native_or_torch()
    assert ("whole", "whole logits of 50 MiB pass the 32 MiB budget") in big.refused
    assert sel(_aa(batch=4096, dropout=True)).impl == "whole"  # dropout needs the whole probabilities
    assert sel(_aa(capture="export", factored_bias=True)).impl == "functional"
    assert sel(_aa(capture="fx")).impl == "functional"
    assert sel(_aa(backend="reference", capture="compile")).impl == "reference"
    compiled = sel(_aa(capture="compile"))
    assert (compiled.impl, compiled.kernel) == ("compiled_inference", "whole")
    assert sel(_aa(capture="compile", factored_bias=True)).kernel == _native_or_torch()
    training = sel(_aa(capture="compile", grad=True))
    assert (training.impl, training.kernel) == ("compiled_blocked", _native_or_torch())
    assert sel(_aa(capture="compile", dropout=True)).impl == "functional"
    assert sel(_aa(device="meta")).impl == "whole"
    assert sel(_aa(device="meta", factored_bias=True)).impl == "blocked_torch"
    refused = dict(sel(_aa(device="meta", factored_bias=True)).refused)
    assert refused["blocked_native"] == "it runs on CPU tensors, not meta"
    assert sel(_aa(head_dim=6, factored_bias=True)).impl == "blocked_torch"


def test_budgets_move_the_choice() -> None:
    grad = _aa(grad=True, batch=64)  # 64 * 2 * 64 * 25 * 4 bytes = 800 KiB of logits
    assert dispatch.select_implementation(grad).impl == "whole"
    tight = dataclasses.replace(ops.KernelPolicy(), whole_logits_bytes_training=1 << 19)
    assert dispatch.select_implementation(grad, tight).impl == _native_or_torch()
    with ops.policy(whole_logits_bytes_training=1 << 19):
        assert dispatch.select_implementation(grad).impl == _native_or_torch()


def test_full_attention_and_layer_choices() -> None:
    sel = dispatch.select_implementation
    full = dict(op="full_attention", window=0, keys=64)
    assert sel(_aa(**full)).impl == "inference"
    assert sel(_aa(**full, grad=True)).impl == "sdpa"
    with ops.policy(full_attention_block_bytes=1024):
        assert sel(_aa(**full, grad=True)).impl == "sdpa_blocked"
        assert sel(_aa(**full, grad=True, capture="export")).impl == "sdpa"
    assert sel(_aa(**full, device="cuda")).impl == "sdpa"
    layer = dict(op="conv_glu", backend="torch", device="cpu", grad=False, capture="eager", autocast=False)
    assert sel(ops.LayerProblem(**layer)).impl == "inference"
    assert sel(ops.LayerProblem(**{**layer, "grad": True})).impl == "recompute"
    assert sel(ops.LayerProblem(**{**layer, "dropout": True})).impl == "reference"
    assert sel(ops.LayerProblem(**{**layer, "capture": "compile", "grad": True})).impl == "compiled_train"
    assert sel(ops.LayerProblem(**{**layer, "capture": "compile", "grad": True, "biases": False})).impl == "traceable"
    assert sel(ops.LayerProblem(**{**layer, "op": "sr_gelu_pool", "capture": "export"})).impl == "traceable"


def test_triton_gives_way_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "triton_usable", lambda device_type: True)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="runs in the 'torch' backend instead of 'triton'.*dropout"):
        choice = dispatch.select_implementation(_aa(backend="triton", device="cuda", dropout=True))
    assert choice.impl == "whole" and choice.refused[0][0] == "triton"
    assert dispatch.select_implementation(_aa(backend="triton", device="cuda")).impl == "triton"


def test_factored_bias_is_a_declared_capability() -> None:
    """Factors are wanted only past the bias budget and only where the chosen implementation takes them."""
    big = _aa(tokens=4096, keys=1024)  # 32 MiB of float32 bias
    assert dispatch.wants_factored_bias(big)
    assert not dispatch.wants_factored_bias(dataclasses.replace(big, tokens=64))
    assert not dispatch.wants_factored_bias(dataclasses.replace(big, backend="reference"))
    assert not dispatch.wants_factored_bias(dataclasses.replace(big, capture="export"))
    assert not dispatch.wants_factored_bias(dataclasses.replace(big, dropout=True))
    takes = {i.name for i in dispatch.IMPLEMENTATIONS["aggregated_attention"] if i.factored_bias}
    assert takes == {"compiled_inference", "compiled_blocked", "blocked_native", "blocked_torch"}


def test_bias_given_as_factors_is_materialised_for_an_implementation_without_them() -> None:
    from test_ops import aa_inputs, assert_close
    from transnext.ops.bias import SeparableBias

    t, extra = aa_inputs(1, 2, (5, 6), 4, (2, 3))
    sep = SeparableBias.from_dense(t["pool_bias"], extra["size"])

    def run(bias, backend):
        return ops.aggregated_attention(
            t["q"], t["k"], t["v"], t["k_pool"], t["v_pool"], t["query_embedding"], t["temperature"],
            extra["length_scale"], t["local_bias"], bias, t["learnable_tokens"], t["learnable_bias"],
            extra["padding_mask"], extra["size"], 3, backend=backend)

    ref = run(t["pool_bias"], "reference")
    assert_close(run(sep, "reference"), ref, "reference output from factors")  # it takes the whole bias
    assert_close(run(sep, "torch"), ref, "blocked output from factors")


# ------------------------------------------------------------------------------ capture mode
def test_capture_mode_in_each_situation() -> None:
    assert ops.capture_mode() == "eager"
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(ops.capture_mode())
            return x + 1

    torch.fx.symbolic_trace(Probe())
    torch.jit.trace(Probe(), torch.ones(2))
    torch.compile(Probe(), backend="eager")(torch.ones(2))
    assert seen[0] == "fx" and seen[1] == "export" and seen[-1] == "compile"  # (trace also checks eagerly)


# ------------------------------------------------------------------------------ decisions per layer
def test_describe_decisions_per_layer() -> None:
    model = transnext.TransNeXt(img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
                                mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 2, 1), num_classes=5)
    rows = ops.describe_decisions(model, (64, 96), batch=2)
    assert [r["layer"] for r in rows[:3]] == ["block1.0.attn", "block1.0.attn", "block1.0.mlp"]
    assert [r["op"] for r in rows[:3]] == ["sr_gelu_pool", "aggregated_attention", "conv_glu"]
    assert {r["impl"] for r in rows if r["op"] == "aggregated_attention"} == {"whole"}
    assert {r["impl"] for r in rows if r["op"] == "full_attention"} == {"inference"}
    with ops.policy(aggregated_bias_bytes_training=0, whole_logits_bytes_training=0):
        train = ops.describe_decisions(model, 64, train=True)
    aa = [r for r in train if r["op"] == "aggregated_attention"]
    assert {r["impl"] for r in aa} == {_native_or_torch()} and "the bias comes as factors" in aa[0]["reason"]
    text = ops.format_decisions(rows)
    assert "block3.0-1.attn aggregated_attention" in text and "block4.0.attn full_attention" in text
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_dispatch_logs_decisions_at_debug(caplog) -> None:
    from test_ops import aa_inputs, run_aa

    t, extra = aa_inputs(1, 2, (5, 6), 4, (2, 3))
    with caplog.at_level("DEBUG", logger="transnext.ops.dispatch"), torch.no_grad():
        run_aa("torch", t, extra)
    assert any("aggregated_attention: whole: small enough for one pass" in r.getMessage() for r in caplog.records)
