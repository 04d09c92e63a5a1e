"""A component's declared built-in twin (``Component.hf_equivalent``): a third-party component that
has the parameters and the function of a built-in (a faster kernel, say) names it, and what knows
only the built-ins (``gptx export --format hf``) treats it as that built-in. The options they share
by name carry over; ``gptx check-plugin`` compares the two on the same weights
(``gptx.conformance.check_hf_equivalent``)."""
from __future__ import annotations

import dataclasses

from gptx.errors import GptxError
from gptx.kinds import KINDS


def twin_spec(kind: str, key: str, spec, reg):
    """The built-in ``spec.cls`` declares (a ``gptx.config.ComponentSpec`` with the options both
    have by name, the built-in's defaults for the rest); ``spec`` itself when it declares none
    or is a built-in. ``key``: the config table, for the one-line refusal of a bad declaration."""
    from gptx.config import ComponentSpec
    from gptx.options import fields_of, parse, to_dict

    declared = getattr(spec.cls, "hf_equivalent", None)
    if declared is None or reg.get(kind, spec.name).plugin.builtin:
        return spec
    entry = reg.entries[kind].get(declared)
    if entry is None or not entry.plugin.builtin:
        raise GptxError(f"{key} '{spec.name}' declares hf_equivalent = '{declared}', which is not a built-in {kind}")
    fields = fields_of(entry.cls.Options)
    shared = {k: v for k, v in to_dict(spec.options).items() if k in fields}
    options = parse(entry.cls.Options, shared, key)
    refs = {name: reg.get(f.metadata["kind"], getattr(options, name)) for name, f in fields.items()
            if f.metadata.get("kind") and getattr(options, name) is not None}
    return ComponentSpec(name=declared, options=options, cls=entry.cls, refs=refs)


def as_builtins(model_cfg, reg=None):
    """``model_cfg`` (a ``ModelConfig``) with each component that declares a built-in twin
    replaced by it, and each option naming a component (the block's placement) likewise."""
    from gptx import registry as registry_mod

    reg = reg or registry_mod.registry()
    changes = {}
    for kind in KINDS:
        if kind.path[:1] != ("model",):
            continue
        spec = twin_spec(kind.name, kind.table, getattr(model_cfg, kind.path[1]), reg)
        renamed = {name: ref.cls.hf_equivalent for name, ref in spec.refs.items()
                   if getattr(ref.cls, "hf_equivalent", None) and not ref.plugin.builtin}
        if renamed:  # e.g. a placement declaring 'pre': the option names the built-in instead
            options = dataclasses.replace(spec.options, **renamed)
            refs = spec.refs | {name: reg.get(spec.refs[name].kind, value) for name, value in renamed.items()}
            spec = dataclasses.replace(spec, options=options, refs=refs)
        changes[kind.path[1]] = spec
    return dataclasses.replace(model_cfg, **changes)


def differing_weights(model, model_cfg):
    """The first state-dict key whose presence or shape differs between ``model`` and the model
    ``model_cfg`` builds (built on the meta device: no memory, no time), as a phrase; None when
    every key and shape agrees."""
    import torch

    from gptx.model import GPT

    with torch.device("meta"):
        twin = GPT(model_cfg).state_dict()
    ours = model.state_dict()
    for name in sorted(set(ours) | set(twin)):
        if name not in twin:
            return f"{name} is not a weight of the built-in"
        if name not in ours:
            return f"{name} is missing"
        if tuple(ours[name].shape) != tuple(twin[name].shape):
            return f"{name} is {list(ours[name].shape)}, the built-in's {list(twin[name].shape)}"
    return None
