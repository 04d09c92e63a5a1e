"""Typed component outputs (``AttentionOutput``, ``FeedForwardOutput``, ``BlockOutput``): a plugin
written before them, returning tuples and calling ``split_aux``, still computes the very same
model, with one DeprecationWarning per class that says what to return instead; an output of any
other shape is one clear error naming the class, which ``gptx check-plugin`` reports as a failed
contract."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import gptx
from gptx import conformance
from gptx import registry as registry_mod
from gptx.cli import error_line
from gptx.components import Aux, FeedForwardOutput, split_aux
from gptx.config import from_dict
from gptx.errors import ComponentOutputError
from gptx.model import GPT
from gptx.plugins.attention import CausalSelfAttention
from gptx.plugins.blocks import ParallelBlock
from gptx.plugins.ffn import GeluMLP

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 64}


def energy(y: torch.Tensor) -> Aux:  # y [B, T, C]
    return Aux(losses={"energy": (y.pow(2).mean(), 0.5)}, metrics={"mean": y.mean()})


def plugin(**components) -> types.ModuleType:
    """A plugin module registering ``{name: (kind, cls)}``, as a third-party package would."""
    mod = types.ModuleType("outputs_plugin")
    for kind in {k for k, _ in components.values()}:
        def hook(register, kind=kind):
            for name, (k, cls) in components.items():
                if k == kind:
                    register(name, cls)
        hook.__name__ = f"register_{kind}"
        setattr(mod, hook.__name__, gptx.hookimpl(specname=hook.__name__)(hook))
    return mod


def legacy_classes():
    """Components as written before the typed outputs: tuples out, ``split_aux`` and tuple
    unpacking in. Fresh classes per call: each deprecation is reported once per class and process."""

    class LegacyAttention(CausalSelfAttention):
        def forward(self, x, positions, positional, past=None, attention_mask=None):
            y, present = super().forward(x, positions, positional, past, attention_mask)  # unpacks the typed output
            return y, present

    class LegacyMLP(GeluMLP):
        def forward(self, x):
            y = super().forward(x)  # [B, T, C]
            return (y, energy(y)) if self.training else y

    class LegacyBlock(ParallelBlock):
        def forward(self, x, positions, positional, past, attention_mask):  # ParallelBlock as it was written
            h = self.norm(x)  # [B, T, C]
            (y, present), attn_aux = split_aux(self.attn(h, positions, positional, past, attention_mask), 2)
            (m,), ffn_aux = split_aux(self.mlp(h), 1)
            return x + y + m, present, Aux.merged(attn=attn_aux, ffn=ffn_aux)

    return LegacyAttention, LegacyMLP, LegacyBlock


class TypedMLP(GeluMLP):
    def forward(self, x):
        y = super().forward(x)  # [B, T, C]
        return FeedForwardOutput(y, energy(y) if self.training else None)


def build(reg, seed=0, **slots) -> GPT:
    cfg = from_dict({"model": TINY | {k: {"kind": v} for k, v in slots.items()}, "tokenizer": {"kind": "byte"}}, reg)
    cfg.model.vocab_size = 64
    torch.manual_seed(seed)
    return GPT(cfg.model)


def test_a_legacy_tuple_plugin_computes_the_same_model_with_one_warning_per_class():
    attention, mlp, block = legacy_classes()
    reg = registry_mod.load(extra_plugins=(plugin(legacy_causal=("attention", attention), legacy_mlp=("ffn", mlp),
                                                  legacy_parallel=("block", block), typed_mlp=("ffn", TypedMLP)),))
    typed = build(reg, ffn="typed_mlp", block="parallel")
    legacy_parts = build(reg, attention="legacy_causal", ffn="legacy_mlp", block="parallel")  # read by .of
    legacy_block = build(reg, ffn="typed_mlp", block="legacy_parallel")  # reads typed parts with split_aux
    ids = torch.randint(0, 64, (2, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # more layers and calls than warnings
            want = typed(ids[:, :-1], targets=ids[:, 1:])
            for legacy in (legacy_parts, legacy_block):
                got = legacy(ids[:, :-1], targets=ids[:, 1:])
                assert torch.equal(got.loss, want.loss) and got.aux.keys() == want.aux.keys() == {
                    "aux/layer0.ffn/energy", "aux/layer1.ffn/energy"}
        want_logits, want_presents = typed.eval()(ids)
        for legacy in (legacy_parts, legacy_block):
            logits, presents = legacy.eval()(ids)
            assert torch.equal(logits, want_logits)
            assert all(torch.equal(a, b) for p, q in zip(presents, want_presents) for a, b in zip(p, q))
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    for cls, instead in ((block, "gptx.components.BlockOutput(x, present, aux=None)"),
                         (attention, "gptx.components.AttentionOutput(y, present, aux=None)"),
                         (mlp, "a tensor [B, T, C] or gptx.components.FeedForwardOutput(y, aux=None)")):
        said = [m for m in messages if f"{cls.__qualname__}.forward returned a tuple" in m]
        assert len(said) == 1 and f"return {instead} instead" in said[0], messages  # once, for 2 layers x 3 calls
    assert len([m for m in messages if f"split_aux (called from {__name__})" in m]) == 1, messages
    assert len([m for m in messages if "unpacks an output (AttentionOutput) as a tuple" in m]) == 1, messages


def test_another_output_shape_is_one_clear_error_and_a_failed_check():
    class TwoTensorsMLP(GeluMLP):
        def forward(self, x):
            y = super().forward(x)  # [B, T, C]
            return y, y  # no contract has this shape

    reg = registry_mod.load(extra_plugins=(plugin(two_tensors=("ffn", TwoTensorsMLP)),))
    model = build(reg, ffn="two_tensors")
    with pytest.raises(ComponentOutputError) as err:
        model(torch.zeros(2, 5, dtype=torch.long))
    want = (f"ffn {__name__}.{TwoTensorsMLP.__qualname__} returned a tuple of 2 (Tensor [2, 5, 32], Tensor [2, 5, 32]); "
            "its forward must return a tensor [B, T, C] or gptx.components.FeedForwardOutput(y, aux=None)")
    assert str(err.value) == want
    assert error_line(err.value) == (want, 2)  # the command line prints it on one line, exit code 2
    results = {r.check: r for r in conformance.run(reg.get("ffn", "two_tensors"), reg)}  # what check-plugin prints
    for check in ("forward shapes", "typed outputs", "trains"):
        assert results[check].status == "fail" and "TwoTensorsMLP returned a tuple of 2" in results[check].detail
        assert "\n" not in results[check].detail


@pytest.fixture()
def process_registry():
    """Makes a registry process-wide (checkpoints and the export rebuild models through it)."""
    yield registry_mod.use
    registry_mod.use(None)


def test_check_plugin_passes_a_legacy_tuple_plugin_and_names_its_deprecation(process_registry):
    _, _, block = legacy_classes()
    reg = registry_mod.load(extra_plugins=(plugin(legacy_parallel=("block", block)),))
    process_registry(reg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        results = {r.check: r for r in conformance.run(reg.get("block", "legacy_parallel"), reg)}
    assert all(r.status == "pass" for r in results.values()), results  # ONNX export and checkpoints included
    detail = results["typed outputs"].detail
    assert "LegacyBlock: tuple (deprecated: return gptx.components.BlockOutput(x, present, aux=None))" in detail
    assert "CausalSelfAttention: AttentionOutput" in detail and "GeluMLP: tensor" in detail  # read by split_aux
