"""``gptx check-plugin``: the contract every component keeps, checked on any installed component
(built-in or third-party) in its own slot with the defaults elsewhere. Shipped in the package, so
a plugin author runs it without a gptx checkout; gptx's own tests (tests/test_menu.py) run exactly
these checks on every built-in.

Each check passes, fails with a reason, or does not apply (a component that does not declare
``kv_cache`` is not checked for cached decoding; one without ``onnx_export`` is not exported).
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import math
import shutil
import tempfile
import traceback
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch

from gptx.base import KV_CACHE, ONNX_EXPORT, Tokenizer
from gptx.errors import ComponentOutputError, GptxError, first_line
from gptx.kinds import BY_NAME, KINDS

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64}
B, T = 2, 20  # forward and decoding checks
TRAIN_B, TRAIN_T, TRAIN_STEPS = 8, 32, 30
TOLERANCE = 1e-4  # cached against uncached logits, export against torch
# A cache that declares integer tensors holds quantised codes (the causal attention's int8 cache):
# lossy by design, so its cached logits are held to a share of the logits' range instead
QUANTIZED_CACHE_RTOL = 2e-2


@dataclasses.dataclass
class Result:
    kind: str
    name: str
    check: str
    status: str  # "pass", "fail" or "n/a"
    detail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CheckFailed(Exception):
    """A contract the component does not keep; the message says how."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def sample_text(chars: int = 40_000) -> str:
    """Real text for training checks: the start of tiny Shakespeare, shipped with gptx."""
    return (experiments_dir() / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]


# ---- building the thing under test ---------------------------------------------------------------

def tiny_experiment() -> dict:
    """The checks' default experiment: a tiny model on the byte tokenizer, defaults elsewhere."""
    return {"model": dict(TINY), "tokenizer": {"kind": "byte"}}


def experiment(kind: str, name: str, options: Optional[dict] = None, setting: Optional[dict] = None, **model) -> dict:
    """The config putting component ``name`` of ``kind`` in its slot: in ``setting`` (a resolved
    experiment, see ``load_setting``) when given, else in a tiny model with defaults elsewhere.
    The setting's options for that slot are kept when they are this component's."""
    raw = copy.deepcopy(setting) if setting is not None else tiny_experiment()
    raw.setdefault("model", {}).update(model)
    if kind == "norm_placement":  # chosen by name in the sequential block's options, not in a table
        block = raw["model"].get("block") or {}
        raw["model"]["block"] = {**(block if block.get("kind") == "sequential" else {"kind": "sequential"}), "placement": name}
        return raw
    *parents, key = BY_NAME[kind].path  # e.g. ("training", "optimizer"): the kind's table
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(key) if isinstance(node.get(key), dict) else {}
    kept = {k: v for k, v in current.items() if k != "kind"} if current.get("kind", BY_NAME[kind].default) == name else {}
    node[key] = {"kind": name, **kept, **(options or {})}
    return raw


def load_setting(file: Optional[str], overrides: list[str], registry=None) -> Optional[dict]:
    """The experiment check-plugin checks components in: ``file`` (its data, tokenizer, model and
    training options) with the ``--set`` overrides, validated like ``gptx validate`` (a bad one is
    a ConfigError naming the file or --set item and the key) and resolved (paths absolute). None
    when neither is given: the tiny defaults."""
    from gptx.config import experiment_from, load_experiment

    if file is None and not overrides:
        return None
    if file is not None:
        cfg = load_experiment(file, overrides, registry)
    else:  # the tiny default, as if it were a file beside the shipped experiments (their data)
        cfg = experiment_from(tiny_experiment(), experiments_dir() / "check-plugin.toml", overrides, registry)
    resolved = cfg.to_dict()
    resolved.pop("tracking")  # the checks track nothing
    resolved["training"]["init_from"] = None  # they start from random weights
    return resolved


def experiments_dir() -> Path:
    """The experiments shipped with gptx (their data included): what paths resolve against."""
    return Path(str(resources.files("gptx.experiments")))


def config_of(raw: dict, registry=None, base: Optional[Path] = None):
    """The validated config of ``raw``; its paths resolve against ``base`` (the shipped experiments)."""
    from gptx.config import from_dict

    return from_dict(raw, registry, source=(base or experiments_dir()) / "check-plugin.toml")


def tiny_model(raw: dict, registry=None, seed: int = 0, vocab: int = 256):
    from gptx.model import GPT

    cfg = config_of(raw, registry)
    cfg.model.vocab_size = vocab
    torch.manual_seed(seed)
    return GPT(cfg.model).eval(), cfg


def byte_batch(b: int = TRAIN_B, t: int = TRAIN_T) -> torch.Tensor:
    ids = torch.tensor(list(sample_text().encode("utf-8")))
    starts = torch.arange(b) * (len(ids) // b)
    return torch.stack([ids[s:s + t + 1] for s in starts])  # [b, t + 1]


def train_losses(model, ids: torch.Tensor, steps: int = TRAIN_STEPS, lr: float = 1e-2, optimizer=None) -> list[float]:
    """The model's own objective on one fixed batch; AdamW unless ``optimizer`` is given."""
    model.train()
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def learns(losses: list[float]) -> None:
    first, last = losses[0], min(losses[-3:])
    require(all(math.isfinite(x) for x in losses), f"non-finite loss: {[round(x, 3) for x in losses]}")
    require(last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}: not clearly down (needs < 70% of the first)")


def close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = TOLERANCE, rtol: float = 1e-4) -> None:
    require(got.shape == want.shape, f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    require(diff <= atol + rtol * want.abs().max().item(), f"{what}: differs by {diff:.3g}")


def cache_rtol(model) -> tuple[float, str]:
    """How far cached logits may be from uncached ones, relative to their largest magnitude, and
    how the check's detail says it: exact for a float cache, QUANTIZED_CACHE_RTOL for a quantised one."""
    quantised = [t.name for t in model.cache_layouts()[0] if not t.dtype.is_floating_point]
    if not quantised:
        return 1e-4, ""
    return QUANTIZED_CACHE_RTOL, f" (quantised cache {', '.join(quantised)}: within {QUANTIZED_CACHE_RTOL:.0%} of the logits' range)"


# ---- checks of model components ------------------------------------------------------------------

def check_forward(model, cfg) -> str:
    ids = torch.randint(0, 256, (B, T))
    with torch.no_grad():
        logits, presents = model(ids)
    require(logits.shape == (B, T, 256), f"logits {list(logits.shape)}, expected {[B, T, 256]}")
    require(bool(torch.isfinite(logits).all()), "non-finite logits")
    require(len(presents) == cfg.model.n_layer, f"{len(presents)} presents for {cfg.model.n_layer} layers")
    for layer, (present, layout) in enumerate(zip(presents, model.cache_layouts())):
        require(len(present) == len(layout), f"layer {layer}: {len(present)} cache tensors, declared {len(layout)}")
        for t, decl in zip(present, layout):
            want = [B if d == "batch" else T if d == "seq" else d for d in decl.dims]
            require(list(t.shape) == want, f"layer {layer} cache '{decl.name}': {list(t.shape)}, declared {want}")
    return f"logits {list(logits.shape)}, cache {[t.name for t in model.cache_layouts()[0]]}"


def check_aux(aux, who: str) -> None:
    """An Aux as the objective and the logs read it: 0-d tensors, finite numeric weights."""
    from gptx.components import Aux

    require(isinstance(aux, Aux), f"{who}: aux is a {type(aux).__name__}, expected gptx.components.Aux or None")
    for name, item in aux.losses.items():
        value, weight = item if isinstance(item, tuple) and len(item) == 2 else (None, None)
        require(isinstance(value, torch.Tensor) and value.dim() == 0, f"{who}: aux loss '{name}' must be (0-d tensor, weight)")
        require(isinstance(weight, (int, float)) and math.isfinite(weight), f"{who}: aux loss '{name}' has weight {weight!r}")
    for name, value in aux.metrics.items():
        require(isinstance(value, torch.Tensor) and value.dim() == 0, f"{who}: aux metric '{name}' must be a 0-d tensor")


def output_form(module, value, width: int) -> str:
    """How one call's return value keeps its contract ("BlockOutput", "tensor", "tuple (deprecated:
    ...)"); a CheckFailed when its fields do not."""
    from gptx.components import Attention, AttentionOutput, Block, BlockOutput, FeedForwardOutput

    typed = BlockOutput if isinstance(module, Block) else AttentionOutput if isinstance(module, Attention) else FeedForwardOutput
    if isinstance(value, typed):
        form = typed.__name__
    elif isinstance(value, torch.Tensor):
        form = "tensor"  # a feed-forward's plain form (any other kind fails in ``of``)
    else:
        form = f"tuple (deprecated: return {typed.expected})"
    out = typed.of(value, module)  # a ComponentOutputError for anything else: run() reports its one line
    who = f"{typed.kind} {type(module).__name__}"
    y = out.x if typed is BlockOutput else out.y
    require(isinstance(y, torch.Tensor) and list(y.shape) == [B, T, width],
            f"{who}: output {list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}, expected {[B, T, width]}")
    if typed is AttentionOutput:
        layout = module.cache_layout()
        require(len(out.present) == len(layout) and all(isinstance(t, torch.Tensor) for t in out.present),
                f"{who}: present must be the {len(layout)} tensors cache_layout() declares")
    if out.aux is not None:
        check_aux(out.aux, who)
        form += " with aux"
    return form


def check_typed_outputs(raw, registry) -> str:
    """Every block, attention and feed-forward call, in training and in evaluation, returns its typed
    output (a feed-forward may return its bare tensor) with fields of the contract's shapes. A
    legacy tuple still passes, its deprecation named. A model of its own: training may move state."""
    from gptx.components import Attention, Block, FeedForward

    model, cfg = tiny_model(raw, registry, seed=1)
    calls: list = []
    hooks = [m.register_forward_hook(lambda mod, _args, out: calls.append((mod, out)))
             for m in model.modules() if isinstance(m, (Block, Attention, FeedForward))]
    ids = torch.randint(0, 256, (B, T + 1))
    try:
        with torch.no_grad():
            model.train()
            model(ids[:, :-1], targets=ids[:, 1:])  # training: where components report their Aux
            model.eval()
            model(ids[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    forms = {}
    for module, value in calls:
        form = output_form(module, value, cfg.model.n_embd)
        forms.setdefault(type(module).__name__, set()).add(form)
    return "; ".join(f"{name}: {' / '.join(sorted(f))}" for name, f in forms.items())


def check_cached_decoding(model, cfg) -> str:
    ids = torch.randint(0, 256, (B, T))
    rtol, lossy = cache_rtol(model)
    with torch.no_grad():
        full, _ = model(ids)
        for label, chunks, capacity in (
            ("empty past", [(0, T)], 0),
            ("chunked prefill", [(0, 7), (7, 8), (8, 13), (13, T)], 0),
            ("1-token steps", [(0, 5)] + [(t, t + 1) for t in range(5, T)], 0),
            ("preallocated cache", [(0, 5)] + [(t, t + 1) for t in range(5, T)], T),
        ):
            past, out = model.empty_cache(B, capacity=capacity), []
            for a, b in chunks:
                logits, past = model(ids[:, a:b], past_key_values=past)
                out.append(logits)
            close(torch.cat(out, dim=1), full, label, rtol=rtol)
    return "empty past, chunked prefill, 1-token steps, preallocated cache" + lossy


def check_left_padding(model, cfg) -> str:
    """A left-padded batch gives each real token the logits it gets alone (prefill, then steps)."""
    pad, steps = 4, 3
    long = torch.randint(0, 256, (1, 12 + steps))
    short = torch.randint(0, 256, (1, 12 - pad + steps))
    with torch.no_grad():
        alone = [model(long)[0][0], model(short)[0][0]]
        ids = torch.cat([long[:, :12], torch.cat([torch.zeros(1, pad, dtype=torch.long), short[:, :12 - pad]], 1)])
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :pad] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits, past = model(ids, pos, mask, model.empty_cache(2))
        got = [logits[0], logits[1, pad:]]
        for s in range(steps):
            nxt = torch.stack([long[0, 12 + s], short[0, 12 - pad + s]])[:, None]
            pos, mask = pos[:, -1:] + 1, torch.cat([mask, mask.new_ones(2, 1)], 1)
            step, past = model(nxt, pos, mask, past)
            got = [torch.cat([got[0], step[0]]), torch.cat([got[1], step[1]])]
    rtol, lossy = cache_rtol(model)
    close(got[0], alone[0], "unpadded row", rtol=rtol)
    close(got[1], alone[1], "left-padded row", rtol=rtol)
    return f"{pad} padding tokens, then {steps} cached steps" + lossy


def check_onnx_export(model, cfg) -> str:
    from gptx import checkpoint
    from gptx.export.onnx_export import export_checkpoint
    from gptx.export.runtime import OnnxGenerator
    from gptx.generate import generate_ids
    from gptx.sampling import Sampler

    tok = checkpoint.build_tokenizer(cfg.tokenizer)
    with tempfile.TemporaryDirectory(prefix="gptx-check-") as tmp:
        ck = checkpoint.save(Path(tmp) / "run", 1, model, cfg, tok)
        meta = export_checkpoint(ck, Path(tmp) / "out", log=lambda _m: None, track=False)
        prompts = [list(b"To be, or not"), list(b"Ay")]  # a left-padded batch
        want = generate_ids(model, prompts, 8, Sampler(temperature=0)).ids
        got = OnnxGenerator(Path(tmp) / "out").generate(prompts, 8, Sampler(temperature=0)).ids
    require(got == want, f"greedy ids differ: onnxruntime {got}, torch {want}")
    return f"verified to {meta['verification']['max_abs_diff']:.1e}; greedy ids equal"


def check_trains(model, cfg) -> str:
    losses = train_losses(model, byte_batch())
    learns(losses)
    return f"loss {losses[0]:.3f} -> {min(losses[-3:]):.3f} in {len(losses)} steps"


def check_deterministic(raw, registry) -> str:
    runs = []
    for _ in range(2):
        model, _ = tiny_model(raw, registry, seed=5)
        runs.append(train_losses(model, byte_batch(4, 16), steps=3))
    require(runs[0] == runs[1], f"two runs from one seed differ: {runs[0]} vs {runs[1]}")
    return "same seed, same losses, bit for bit"


def check_checkpoint_round_trip(model, cfg) -> str:
    from gptx import checkpoint

    tok = checkpoint.build_tokenizer(cfg.tokenizer)
    ids = torch.randint(0, 256, (B, T))
    with tempfile.TemporaryDirectory(prefix="gptx-check-") as tmp:
        path = checkpoint.save(Path(tmp), 1, model, cfg, tok)
        again = checkpoint.load(path).model
    with torch.no_grad():
        require(torch.equal(model(ids)[0], again(ids)[0]), "logits after save + load differ")
    return "save, load: identical logits"


def check_hf_equivalent(raw, registry) -> str:
    """The component against the built-in it declares (``hf_equivalent``): the same state-dict
    keys and shapes, and on the same weights the same logits."""
    from gptx.equivalence import as_builtins, differing_weights
    from gptx.model import GPT

    model, cfg = tiny_model(raw, registry, seed=1)
    view = as_builtins(cfg.model, registry)
    problem = differing_weights(model, view)
    require(problem is None, f"the weights are not the built-in's: {problem}")
    twin = GPT(view).eval()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (B, T))
    with torch.no_grad():
        close(model(ids)[0], twin(ids)[0], "logits against the declared built-in's on the same weights")
    return "same weights as the built-in; logits equal on them"


def model_checks(kind: str, name: str, supports: frozenset, registry, options=None,
                 setting=None) -> list[tuple[str, Callable[[], str]]]:
    raw = experiment(kind, name, options, setting)
    raw["tokenizer"] = {"kind": "byte"}  # the checks feed bytes (byte_batch), whatever the experiment's tokenizer
    state: dict = {}

    def built():
        if "model" not in state:
            state["model"], state["cfg"] = tiny_model(raw, registry, seed=1)
        return state["model"], state["cfg"]

    checks = [("builds", lambda: f"{sum(p.numel() for p in built()[0].parameters()):,} parameters in a 2-layer model"),
              ("forward shapes", lambda: check_forward(*built())),
              ("typed outputs", lambda: check_typed_outputs(raw, registry))]
    if KV_CACHE in supports:
        checks += [("cached decoding", lambda: check_cached_decoding(*built())),
                   ("left padding", lambda: check_left_padding(*built()))]
    else:
        checks += [("cached decoding", None), ("left padding", None)]
    checks.append(("ONNX export", (lambda: check_onnx_export(*built())) if ONNX_EXPORT in supports else None))
    checks += [("trains", lambda: check_trains(*tiny_model(raw, registry, seed=3))),
               ("deterministic", lambda: check_deterministic(raw, registry)),
               ("checkpoint round trip", lambda: check_checkpoint_round_trip(*built()))]
    if getattr(registry.get(kind, name).cls, "hf_equivalent", None):  # checked where declared, absent otherwise
        checks.append(("hf equivalent", lambda: check_hf_equivalent(raw, registry)))
    return checks


# ---- checks of the other kinds -------------------------------------------------------------------

def tokenizer_checks(kind, name, supports, registry, options=None, setting=None):
    def build():
        spec = config_of(experiment("tokenizer", name, options, setting), registry).tokenizer
        tok = spec.cls(spec.options, None)
        if tok.requires_fit:
            require(tok.state() == {}, "state() must be {} until the tokenizer is fitted")
            tok.fit(sample_text())
            require(bool(tok.state()), "state() must hold the learned vocabulary once fitted")
        return tok

    def round_trip():
        tok = build()
        text = sample_text(2000).rsplit("\n", 1)[0] + "\n"  # whole lines: a learned vocabulary may be word-level
        ids = tok.encode(text)
        require(bool(ids) and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids), "ids outside the vocabulary")
        require(tok.decode(ids) == text, "decode(encode(text)) != text")
        require(tok.eot_id is None or 0 <= tok.eot_id < tok.vocab_size, f"eot_id {tok.eot_id} outside the vocabulary")
        again = type(tok)(tok.options, tok.state() or None)
        require(again.encode(text) == ids, "rebuilt from (options, state) it encodes differently")
        return f"{len(text)} characters -> {len(ids)} ids and back; rebuilt from its state"

    def trains():
        tok = build()
        ids = torch.tensor(tok.encode(sample_text()[:40 * 4 * 16]))
        starts = torch.arange(4) * (len(ids) // 4)
        batch = torch.stack([ids[s:s + 17] for s in starts])  # [4, 17]
        model, _ = tiny_model(experiment("tokenizer", name, n_layer=1), registry, seed=4, vocab=tok.vocab_size)
        losses = train_losses(model, batch, steps=20, lr=2e-2)
        learns(losses)
        return f"vocabulary {tok.vocab_size:,}: loss {losses[0]:.3f} -> {min(losses[-3:]):.3f}"

    checks = [("round trip", round_trip), ("trains", trains)]
    if registry.get(kind, name).cls.tokenizer_json is not Tokenizer.tokenizer_json:  # checked where implemented
        checks.append(("tokenizer.json", lambda: check_tokenizer_json(build())))
    return checks


# text where tokenizers and JavaScript differ most: Unicode whitespace (U+0085, U+FEFF), combining
# marks, case mappings that change length (İ), astral symbols, written special tokens, the empty text
ODD_TEXTS = ["", "naïve café 🙂 '''s  \t end", "x\u0085y \ufeffz\n\n", "İstanbul ΣΑΣ ǅ", "<|endoftext|>  the end"]


def check_tokenizer_json(tok) -> str:
    """The tokenizer's ``tokenizer_json()`` through the ``tokenizers`` library encodes as ``encode``
    and decodes as ``decode`` (text the tokenizer itself refuses is skipped)."""
    from gptx.plugins.tokenizers import hf_backend
    from gptx.schemas import shown

    described = tok.tokenizer_json()
    if described is None:
        return "tokenizer_json() gives none with these options: it does not travel beyond gptx's Python"
    backend = hf_backend(described)
    compared = 0
    for text in [sample_text(2000), *ODD_TEXTS]:
        try:
            ids = tok.encode(text)
        except GptxError:  # outside its vocabulary (a char tokenizer's): nothing to compare
            continue
        theirs = backend.encode(text, add_special_tokens=False).ids
        require(theirs == ids, f"tokenizer.json encodes {shown(text[:40])} as {theirs[:12]}, encode() as {ids[:12]}")
        decoded = backend.decode(ids, skip_special_tokens=False)
        require(decoded == tok.decode(ids), f"tokenizer.json decodes {ids[:12]} as {shown(decoded[:40])}, "
                                            f"decode() as {shown(tok.decode(ids)[:40])}")
        compared += 1
    return f"{compared} texts: the tokenizers library's ids and text equal encode()'s and decode()'s"


def optimizer_checks(kind, name, supports, registry, options=None, setting=None):
    from gptx.training.step import build_optimizer

    raw = experiment("optimizer", name, options, setting)
    raw["training"]["learning_rate"] = 1e-2  # the rate the other checks train with (30 steps on one batch)

    def make(seed=0):
        model, cfg = tiny_model(raw, registry, seed=seed)
        return model, build_optimizer(cfg, model, torch.device("cpu"))

    def trains():
        model, opt = make()
        losses = train_losses(model, byte_batch(), optimizer=opt)
        learns(losses)
        return f"loss {losses[0]:.3f} -> {min(losses[-3:]):.3f} in {len(losses)} steps"

    def resumes():
        from gptx import distributed

        batch, dist = byte_batch(4, 16), distributed.Dist()
        a, opt_a = make()
        train_losses(a, batch, steps=6, optimizer=opt_a)
        b, opt_b = make()
        train_losses(b, batch, steps=3, optimizer=opt_b)
        state = distributed.full_optimizer_state(b, opt_b, dist)
        with tempfile.TemporaryDirectory() as tmp:  # through the file, as --resume reads it
            saved = Path(tmp) / "trainer.pt"
            torch.save({"optimizer": state}, saved)
            state = torch.load(saved, weights_only=True)["optimizer"]
        c, opt_c = make()
        distributed.load_full_state(c, opt_c, {k: v.clone() for k, v in b.state_dict().items()}, state, dist)
        train_losses(c, batch, steps=3, optimizer=opt_c)
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
        require(same, "3 steps + save + load + 3 steps differ from 6 steps: its state does not round-trip")
        return "3 + save/load (weights_only) + 3 steps = 6 steps, bit for bit"

    return [("trains", trains), ("state round trip", resumes)]


def schedule_checks(kind, name, supports, registry, options=None, setting=None):
    from gptx.training.step import build_schedule

    def values():
        raw = experiment("schedule", name, options, setting)
        if setting is None:
            raw["training"]["max_steps"] = 200
        cfg = config_of(raw, registry)
        schedule = build_schedule(cfg)
        steps = cfg.training.max_steps * 3 // 2  # also past max_steps
        factors = [schedule.factor(step) for step in range(steps)]
        require(all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in factors),
                "factor(step) must be a finite, non-negative number at every step (also past max_steps)")
        require(factors == [build_schedule(cfg).factor(step) for step in range(steps)], "not deterministic")
        require(max(factors) > 0, "the learning rate is 0 at every step")
        return f"factor from {min(factors):.3g} to {max(factors):.3g} over {steps:,} steps (max_steps {cfg.training.max_steps:,})"

    return [("factors", values)]


@functools.lru_cache(maxsize=None)
def data_dir(tokenizer_kind: str, registry) -> Path:
    """A folder a dataset's default paths resolve against, made once per process: the start of
    tiny Shakespeare as ``data/tinyshakespeare.txt`` and the same text prepared by ``gptx prepare``
    with the experiment's tokenizer as ``data/tokens``."""
    from gptx import checkpoint
    from gptx import prepare as prep

    root = Path(tempfile.mkdtemp(prefix="gptx-check-"))
    atexit.register(shutil.rmtree, root, True)
    text = root / "data" / "tinyshakespeare.txt"
    text.parent.mkdir()
    text.write_text(sample_text(200_000), encoding="utf-8")
    tok = checkpoint.build_tokenizer(config_of({"tokenizer": {"kind": tokenizer_kind}}, registry).tokenizer)
    prep.prepare(text, root / "data" / "tokens", tokenizer_kind, tok, prep.PrepareArgs(shard_tokens=50_000, workers=1))
    return root


def dataset_checks(kind, name, supports, registry, options=None, setting=None):
    from gptx import checkpoint

    def build(seed=0):
        raw = experiment("dataset", name, options, setting)
        # an experiment's data paths are resolved already; the defaults read a prepared sample
        base = data_dir(raw["tokenizer"]["kind"], registry) if setting is None else experiments_dir()
        cfg = config_of(raw, registry, base)
        spec = cfg.data
        tok = checkpoint.build_tokenizer(cfg.tokenizer)
        ds = spec.cls(spec.options, base_dir=base, tokenizer=tok, block_size=32, seed=seed)
        ds.prepare()
        return ds

    def serves():
        ds = build()
        x, y = ds.batch(6)
        require(tuple(x.shape) == (6, 32) and tuple(y.shape) == (6, 32), f"batch(6): {list(x.shape)}, {list(y.shape)}")
        require(x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1]), "targets must be the inputs shifted by one")
        xr, _ = build().batch(6, rows=[1, 4])
        require(torch.equal(xr, x[[1, 4]]), "batch(count, rows) must return those rows of the same draw")
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        require(torch.equal(ds.windows("val", 4, g1)[0], ds.windows("val", 4, g2)[0]), "windows() ignores its generator")
        tx, _ = ds.tiled_windows("val", 10 * 32)
        require(tx.shape[1] == 32 and 1 <= tx.shape[0] <= 10, f"tiled_windows: {list(tx.shape)}")
        return f"{ds.tokens('train'):,} training, {ds.tokens('val'):,} validation tokens"

    def resumes():
        a = build()
        a.batch(4)
        state = a.state_dict()
        want = a.batch(4)[0]
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "trainer.pt"
            torch.save({"dataset": state}, saved)
            state = torch.load(saved, weights_only=True)["dataset"]
        b = build()
        b.load_state_dict(state)
        require(torch.equal(b.batch(4)[0], want), "a restored dataset serves other batches")
        return "the batch stream continues after state_dict / load_state_dict (weights_only)"

    return [("serves windows", serves), ("state round trip", resumes)]


CHECKS = {"tokenizer": tokenizer_checks, "optimizer": optimizer_checks, "schedule": schedule_checks,
          "dataset": dataset_checks}


def checks_for(entry, registry, options: Optional[dict] = None,
               setting: Optional[dict] = None) -> list[tuple[str, Optional[Callable[[], str]]]]:
    """The (check name, function or None when it does not apply) list for one registry entry,
    with ``options`` for its table (its defaults otherwise)."""
    make = CHECKS.get(entry.kind, model_checks)
    return make(entry.kind, entry.name, frozenset(entry.supports), registry, options, setting)


def run(entry, registry, progress: Callable[[str], None] = lambda _s: None, options: Optional[dict] = None,
        setting: Optional[dict] = None) -> list[Result]:
    results = []
    for check, fn in checks_for(entry, registry, options, setting):
        if fn is None:
            results.append(Result(entry.kind, entry.name, check, "n/a", "not declared in supports"))
            continue
        progress(f"{entry.kind} {entry.name}: {check}")
        torch.manual_seed(0)
        try:
            results.append(Result(entry.kind, entry.name, check, "pass", fn()))
        except (CheckFailed, ComponentOutputError) as err:  # the contract broken: its message is the whole story
            results.append(Result(entry.kind, entry.name, check, "fail", str(err)))
        except Exception as err:  # noqa: BLE001 - any exception is the component breaking the contract
            where = traceback.extract_tb(err.__traceback__)[-1]
            results.append(Result(entry.kind, entry.name, check, "fail",
                                  f"{type(err).__name__}: {first_line(err)[:200]}"
                                  f" (at {Path(where.filename).name}:{where.lineno})"))
    return results


def select(registry, names: list[str], kind: Optional[str]) -> list:
    """The registry entries to check: by name (of any kind, or of ``kind``), or all of ``kind``, or all."""
    kinds = [BY_NAME[kind]] if kind else list(KINDS)
    if not names:
        return [e for k in kinds for e in sorted(registry.entries[k.name].values(), key=lambda e: e.name)]
    chosen = []
    for name in names:
        found = [registry.entries[k.name][name] for k in kinds if name in registry.entries[k.name]]
        if not found:
            from gptx.options import did_you_mean

            known = [n for k in kinds for n in registry.entries[k.name]]
            raise GptxError(f"'{name}' is not a registered {kind or 'component'}{did_you_mean(name, known)}")
        chosen += found
    return chosen


def table(results: list[Result]) -> str:
    width = max((len(f"{r.kind} {r.name}") for r in results), default=10)
    check_width = max((len(r.check) for r in results), default=10)
    mark = {"pass": "PASS", "fail": "FAIL", "n/a": "n/a "}
    return "\n".join(f"{r.kind + ' ' + r.name:<{width}}  {r.check:<{check_width}}  {mark[r.status]}  {r.detail}"
                     for r in results)
