"""The ``gptx`` command line. Thin: each command parses flags and calls a library function.

Errors a user can fix (GptxError) print one line and exit with code 2, no traceback. Heavy
imports (torch, mlflow) happen inside commands, so ``gptx --help`` and the onnxruntime
generation path stay fast and torch-free.
"""
from __future__ import annotations

import functools
import json
import sys

import click

from gptx import __version__
from gptx.errors import GptxError


def fail(message: str, code: int = 2):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn GptxError (and an OSError from the machine: disk full, permissions) into
    'Error: message' + exit 2 (the one place that does)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GptxError as err:
            fail(str(err), err.exit_code)
        except OSError as err:  # the machine said no (disk full, read-only, a path through a file)
            name = err.filename
            if isinstance(err, FileExistsError) and name and not __import__("os").path.isdir(name):
                fail(f"{name}: exists and is not a directory")
            fail(f"{name}: {err.strerror or err}" if name else f"{err.strerror or err}")

    return wrapper


_warned: set[str] = set()


def _warn(lines) -> None:
    """Each broken-plugin line once per process, however many loaders met it."""
    for line in lines:
        if line not in _warned:
            _warned.add(line)
            click.echo(f"Warning: {line}", err=True)


def registry():
    """The plugin registry; broken third-party plugins are reported once on stderr, never fatal."""
    from gptx import registry as registry_mod

    reg = registry_mod.registry()
    _warn(reg.errors)
    return reg


class GptxGroup(click.Group):
    """Adds the commands that plugins contribute through the ``register_commands`` hook."""

    _plugins_added = False

    def _add_plugin_commands(self):
        """Call each plugin's hook on its own: one that raises is reported on one line and adds
        no command; the others still do (a broken plugin must not break ``gptx --help``)."""
        if self._plugins_added:
            return
        self._plugins_added = True
        from gptx import registry as registry_mod

        pm, plugins, errors = registry_mod.load_third_party()  # no torch unless a plugin imports it
        _warn(errors)
        for impl in pm.hook.register_commands.get_hookimpls():
            before = dict(self.commands)
            try:
                impl.function(cli=self)
            except Exception as err:
                self.commands = before  # nothing half-added
                info = plugins.get(impl.plugin_name) or registry_mod.PluginInfo(
                    impl.plugin_name, impl.plugin_name, "unknown distribution", "?", False)
                _warn([registry_mod._describe(info, err, "register_commands")])

    def list_commands(self, ctx):
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._add_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd


@click.group(cls=GptxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gptx")
def cli():
    """gptx: experiment with GPT-2-style language models, one plugin at a time."""


# ---- plugins and components -----------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json):
    """List the installed plugins, their versions and the hooks they implement."""
    reg = registry()
    rows = [
        {
            "name": info.name,
            "module": info.module,
            "distribution": info.distribution,
            "version": info.version,
            "builtin": info.builtin,
            "hooks": reg.hooks_of(info.name),
        }
        for info in reg.plugins.values()
    ]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "errors": reg.errors}, indent=2))
        return
    for r in rows:
        origin = "built-in" if r["builtin"] else f"{r['distribution']} {r['version']}"
        click.echo(f"{r['name']}  ({origin})\n    hooks: {', '.join(r['hooks'])}")
    for line in reg.errors:
        click.echo(f"BROKEN {line}")


@cli.command()
@click.argument("kind", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def components(kind, as_json):
    """List registered components (optionally of one KIND): name, kind, plugin, capabilities."""
    from gptx.options import did_you_mean
    from gptx.registry import KINDS

    reg = registry()
    if kind is not None and kind not in KINDS:
        raise GptxError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
    rows = [
        {
            "kind": e.kind,
            "name": e.name,
            "plugin": e.plugin.name,
            "distribution": e.plugin.distribution,
            "version": e.plugin.version,
            "supports": sorted(e.supports),
            "overrides": e.overrides.name if e.overrides else None,
            "class": f"{e.cls.__module__}.{e.cls.__qualname__}",
        }
        for k in ([kind] if kind else KINDS)
        for e in sorted(reg.entries[k].values(), key=lambda e: e.name)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        extra = f"  (overrides {r['overrides']})" if r["overrides"] else ""
        origin = f"{r['plugin']} ({r['distribution']} {r['version']})"
        click.echo(f"{r['kind']:<15} {r['name']:<{width}}  {origin:<44} {','.join(r['supports']) or '-'}{extra}")


# ---- generation -----------------------------------------------------------------------------

@cli.command()
@click.argument("source")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-k", default=None, type=click.IntRange(min=1))
@click.option("--top-p", default=None, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"prompt_ids", "ids", "text"} per prompt.')
@friendly
def generate(source, prompts, max_new_tokens, temperature, top_k, top_p, seed, device, as_json):
    """Generate text from SOURCE: a checkpoint directory, a run directory, an MLflow run
    (runs:/<id>) or an ONNX export directory (runs on onnxruntime, without torch)."""
    from gptx.sampling import Sampler

    sampler = Sampler(temperature, top_k, top_p, seed)
    from pathlib import Path

    if (Path(source) / "model.onnx").is_file():
        from gptx.export.runtime import OnnxGenerator

        gen = OnnxGenerator(source)
        tokenizer = gen.tokenizer
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        result = gen.generate(prompt_ids, max_new_tokens, sampler)
    else:
        from gptx import checkpoint
        from gptx.generate import decoding_layout, generate_ids

        ck = checkpoint.load(source, device=device)
        tokenizer = ck.tokenizer
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        if any(not p for p in prompt_ids):
            raise GptxError("--prompt: a prompt must not be empty")
        result = generate_ids(decoding_layout(ck.model), prompt_ids, max_new_tokens, sampler, tokenizer.eot_id)
    for p_ids, new in zip(result.prompt_ids, result.ids):
        text = tokenizer.decode(new)
        if as_json:
            click.echo(json.dumps({"prompt_ids": p_ids, "ids": new, "text": text}))
        else:
            click.echo(tokenizer.decode(p_ids) + text)


# ---- import-hf ------------------------------------------------------------------------------

@cli.command("import-hf")
@click.argument("hf_dir")
@click.option("-o", "--out", "out_dir", required=True, help="New directory for the gptx checkpoint (a run directory).")
@friendly
def import_hf(hf_dir, out_dir):
    """Convert the Hugging Face GPT-2 model in HF_DIR (config.json + model.safetensors or
    pytorch_model.bin) into a gptx checkpoint that `gptx generate OUT_DIR` runs."""
    from gptx.hf import import_hf as convert

    path = convert(hf_dir, out_dir, registry())
    click.echo(f"wrote {path}")

# ---- experiments ----------------------------------------------------------------------------

def _load(file, overrides):
    from gptx.config import load_experiment

    registry()  # report broken plugins before validating
    return load_experiment(file, overrides)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (TOML syntax); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved config as JSON.")
@friendly
def validate(file, overrides, as_json):
    """Check an experiment FILE (and its data) without training."""
    cfg = _load(file, overrides)
    if as_json:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
    else:
        m = cfg.model
        click.echo(
            f"{file}: OK — {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}; "
            f"attention {m.attention.kind}, positional {m.positional.kind}, ffn {m.ffn.kind}, "
            f"norm {m.norm.kind}/{m.norm.placement}; tokenizer {cfg.tokenizer.kind}; data {cfg.data_path}"
        )


def _run_forwarding_signals(args: list[str]) -> int:
    """Run torchrun as a child; SIGINT/SIGTERM sent to us go to it (it passes them to every rank,
    which checkpoint and stop together). Returns the child's exit code."""
    import signal
    import subprocess

    child = subprocess.Popen(args)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (TOML syntax); repeatable.")
@click.option("--resume", is_flag=True, help="Continue the newest interrupted run of this experiment.")
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Launch N processes on this machine through torchrun (DDP).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly
def run(file, overrides, resume, nproc, quiet):
    """Train the experiment in FILE, tracked in MLflow; print a sample at the end."""
    if nproc is not None and "WORLD_SIZE" not in __import__("os").environ:
        _load(file, overrides)  # bad input fails here, once, not in N processes
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "gptx", "run", file, *[f"--set={o}" for o in overrides]]
        args += ["--resume"] * resume + ["--quiet"] * quiet
        sys.exit(_run_forwarding_signals(args))
    from gptx.train import Interrupted, train

    cfg = _load(file, overrides)
    try:
        result = train(cfg, resume=resume, progress=not quiet)
    except Interrupted as err:
        click.echo(f"Stopped: {err}. Continue with: gptx run {file} --resume", err=True)
        sys.exit(err.exit_code)
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return
    if result.sample is not None:
        click.echo("\n---- sample ----")
        click.echo(result.sample)
        click.echo("----------------")
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    final = f" (whole validation split: {result.final_val_loss:.4f})" if result.final_val_loss is not None else ""
    click.echo(f"val loss {val}{final} after {result.step} steps, {result.tokens_per_sec:,.0f} tokens/s")
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.run_id:
        click.echo(f"MLflow run: {result.run_id} (browse with: mlflow ui; generate with: gptx generate runs:/{result.run_id} --prompt ...)")


# ---- ONNX export -----------------------------------------------------------------------------

@cli.command("export")
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Export directory to write.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=18, max=23), help="ONNX opset.")
@click.option("--quantize", default=None, metavar="int8|int4",
              help="Quantize the weights: int8 (dynamic int8 matmuls) or int4 (4-bit blocks, MatMulNBits).")
@click.option("--force", is_flag=True, help="Replace OUT even if it is a non-empty directory that is not a gptx export.")
@click.option("--track/--no-track", default=None, help="Log the export to the source's MLflow run (default: when it has one).")
@friendly
def export(source, out_dir, opset, quantize, force, track):
    """Export SOURCE (a checkpoint or run directory, or runs:/<id>) to ONNX in OUT: model.onnx with
    a KV cache, genai_config.json, tokenizer.json (GPT-2 BPE) and gptx_export.json; verified
    against PyTorch before it reports success."""
    from gptx.export.onnx_export import export_checkpoint

    export_checkpoint(source, out_dir, opset=opset, quantize=quantize, force=force, track=track, log=click.echo)


@cli.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.option("--vary", multiple=True, required=True, metavar="KEY.PATH=V1,V2,...", help="Values to try for one key; several --vary make a grid.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value in every variant.")
@click.option("--json", "as_json", is_flag=True, help="Print the result rows as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly
def sweep(base, vary, overrides, as_json, quiet):
    """Train every combination of --vary values over BASE (one MLflow run each, under one
    parent run) and compare them: val loss, tokens/s, parameters."""
    from pathlib import Path

    from gptx import sweep as sweep_mod

    registry()
    parent, rows = sweep_mod.sweep(Path(base), list(vary), list(overrides), progress=not quiet)
    if as_json:
        click.echo(json.dumps({"parent_run_id": parent, "variants": rows}, indent=2))
    else:
        click.echo(sweep_mod.table(rows))
        if parent:
            click.echo(f"MLflow parent run: {parent}")


# ---- bench ----------------------------------------------------------------------------------

@cli.command()
@click.option("--only", default="peak,train,generate", show_default=True, metavar="SECTIONS",
              help="Comma-separated sections: peak, train, generate.")
@click.option("--experiment", type=click.Path(dir_okay=False), default=None,
              help="Experiment file for the train section (default: experiments/shakespeare_char.toml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value of the experiment; repeatable.")
@click.option("--train-steps", default=50, show_default=True, type=click.IntRange(min=1), help="Timed training steps.")
@click.option("--warmup-steps", default=5, show_default=True, type=click.IntRange(min=0), help="Untimed steps first (compile, caches).")
@click.option("--model", "model_size", default="tiny", show_default=True, type=click.Choice(["tiny", "gpt2"]),
              help="Randomly initialised model for the generate section: tiny (4x128) or gpt2 (124M).")
@click.option("--checkpoint", "checkpoint_dir", default=None, help="Generate with this checkpoint instead of a random model.")
@click.option("--backends", default="torch,ort,ort-int8,ort-int4,hf,genai", show_default=True,
              help="Generation backends (hf and genai when installed).")
@click.option("--prompt-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed generations per backend.")
@click.option("--peak-seconds", default=1.0, show_default=True, type=click.FloatRange(min=0.01), help="Time per matmul peak.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch/onnxruntime threads (default: torch's).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly
def bench(only, experiment, overrides, train_steps, warmup_steps, model_size, checkpoint_dir, backends,
          prompt_tokens, new_tokens, repeats, peak_seconds, threads, as_json):
    """Measure this machine: matmul peak, training tokens/s and MFU, generation tokens/s, time to
    first token and memory (PyTorch, onnxruntime fp32/int8/int4, HF and onnxruntime-genai as peers)."""
    from gptx import bench as bench_mod

    registry()
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    result = bench_mod.run(
        sections=split(only), experiment=experiment or bench_mod.DEFAULT_EXPERIMENT, overrides=tuple(overrides),
        train_steps=train_steps, warmup_steps=warmup_steps, model=model_size, checkpoint_dir=checkpoint_dir,
        backends=split(backends), prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
        peak_seconds=peak_seconds, threads=threads, log=lambda s: click.echo(s, err=True) if not as_json else None,
    )
    click.echo(json.dumps(result, indent=2) if as_json else bench_mod.table(result))


def main():
    cli(prog_name="gptx")


if __name__ == "__main__":
    main()
