"""The ``gptx`` command line. Thin: each command parses flags and calls a library function.

Every error ends the same way, in one place (``GptxGroup.main``): a mistake in what the user
gave (GptxError, a usage error of Click, the machine refusing a path) prints one line
``Error: ...`` on stderr and exits 2; anything unforeseen prints one line asking for a report and
exits 1 (``GPTX_DEBUG=1`` shows the traceback). Heavy imports (torch, mlflow) happen inside
commands, so ``gptx --help`` and the onnxruntime generation path stay fast and torch-free.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from gptx import __version__
from gptx.errors import GptxError, first_line
from gptx.export.gguf_export import TYPES as GGUF_TYPES
from gptx.kinds import KINDS
from gptx.numeric import NumberError, env_int, parse_float, parse_int

REPORT_URL = "https://github.com/gptx-dev/gptx/issues"


def fail(message: str, code: int = 2):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def one_line(err: click.UsageError) -> str:
    """A usage error as ``<option>: <problem>``, the form every gptx error takes."""
    if isinstance(err, click.NoSuchOption):
        hint = f" (did you mean {' or '.join(err.possibilities)}?)" if err.possibilities else ""
        return f"{err.option_name}: no such option{hint}"
    if isinstance(err, click.BadParameter) and not isinstance(err, click.MissingParameter) and err.param is not None:
        param = err.param
        where = max(param.opts, key=len) if isinstance(param, click.Option) and param.opts else param.human_readable_name
        return f"{where}: {err.message}"
    return " ".join(err.format_message().split()).rstrip(".")


def error_line(err: BaseException) -> tuple[str, int]:
    """The one line and the exit code for an exception that reached the command line."""
    if isinstance(err, GptxError):
        return str(err), err.exit_code
    if isinstance(err, click.UsageError):
        return one_line(err), 2
    if isinstance(err, click.ClickException):
        return " ".join(err.format_message().split()), 2
    if isinstance(err, OSError):  # the machine said no (disk full, read-only, a path through a file)
        name = err.filename
        if isinstance(err, FileExistsError) and name and not os.path.isdir(name):
            return f"{name}: exists and is not a directory", 2
        return (f"{name}: {err.strerror or err}" if name else f"{err.strerror or err}"), 2
    if isinstance(err, (MemoryError, RecursionError)):
        return f"{type(err).__name__}: the input is too large or too deeply nested for this machine", 2
    return (f"internal error: {type(err).__name__}: {first_line(err)[:300]} (please report it at {REPORT_URL}; "
            "GPTX_DEBUG=1 shows the traceback)"), 1


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
    """Adds the commands that plugins contribute through the ``register_commands`` hook, and
    turns every error into one line."""

    _plugins_added = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - the one place every error becomes one line
            if os.environ.get("GPTX_DEBUG") and not isinstance(err, (GptxError, click.ClickException)):
                raise
            message, code = error_line(err)
            click.echo(f"Error: {message}", err=True)
            sys.exit(code)
        sys.exit(code if isinstance(code, int) else 0)

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


class BoundedInt(click.ParamType):
    """An integer in [low, high]; anything else (text, '²', '+-1', 2**70, a float) is a one-line error."""

    name = "integer"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            return parse_int(value, "", self.low, self.high)
        except NumberError as err:
            self.fail(err.problem, param, ctx)


class BoundedFloat(click.ParamType):
    """A finite number in [low, high] (``low_open``: above low); NaN, infinity and text are
    one-line errors."""

    name = "number"

    def __init__(self, low: float, high: float, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        try:
            return parse_float(value, "", self.low, self.high, self.low_open, self.high_open)
        except NumberError as err:
            self.fail(err.problem, param, ctx)


class Device(click.ParamType):
    """cpu, cuda, cuda:N or mps."""

    name = "device"

    def convert(self, value, param, ctx):
        from gptx.config import _valid_device

        if not _valid_device(str(value)) or value == "auto":
            self.fail(f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}", param, ctx)
        return str(value)


OPEN_UNIT = BoundedFloat(0.0, 1.0, low_open=True, high_open=True)  # a significance level
MAX_TOKENS = 1 << 24


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
@click.argument("what", required=False, metavar="[KIND|NAME]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def components(what, as_json):
    """List the registered components: kind, name, plugin, capabilities and options. WHAT is a
    kind (attention, optimizer, ...) to list those, or a component's name to show it alone."""
    from gptx import catalog

    reg = registry()
    entries = catalog.select(reg, what)
    rows = [catalog.describe(e) for e in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(catalog.table(rows, detailed=what is not None))


@cli.command("check-plugin")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--kind", type=click.Choice([k.name for k in KINDS]),
              default=None, help="Only components of this kind.")
@click.option("--experiment", "experiment_file", type=click.Path(dir_okay=False), default=None,
              help="Check inside this experiment: its data, tokenizer, model and training options.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a value of the experiment (or of the tiny default); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check_plugin(names, kind, experiment_file, overrides, as_json):
    """Check that installed components keep gptx's contracts: each NAME (or every component of
    --kind, or every installed component) in its own slot of a tiny model, defaults elsewhere,
    or of the experiment --experiment and --set describe (a component keeps that slot's options
    when the slot names it). Forward shapes, cached decoding and left padding (when it declares
    kv_cache), ONNX export parity (onnx_export), a short training run whose loss must fall,
    determinism, a checkpoint round trip; tokenizers, optimizers, schedules and datasets their
    own. Exit 0 only when every check that applies passes."""
    from gptx import conformance

    reg = registry()
    setting = conformance.load_setting(experiment_file, list(overrides), reg)  # bad input: one line, exit 2
    entries = conformance.select(reg, list(names), kind)
    say = (lambda s: None) if as_json else (lambda s: click.echo(f"  checking {s}", err=True))
    results = [r for e in entries for r in conformance.run(e, reg, say, setting=setting)]
    failed = [r for r in results if r.status == "fail"]
    if as_json:
        click.echo(json.dumps({"passed": not failed, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        click.echo(conformance.table(results))
        click.echo(f"\n{len(entries)} component(s): {sum(r.status == 'pass' for r in results)} checks passed, "
                   f"{len(failed)} failed, {sum(r.status == 'n/a' for r in results)} not applicable")
    if failed:
        sys.exit(1)


# ---- generation -----------------------------------------------------------------------------

@cli.command()
@click.argument("source")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--max-new-tokens", default=100, show_default=True, type=BoundedInt(1, MAX_TOKENS))
@click.option("--temperature", default=0.8, show_default=True, type=BoundedFloat(0.0, 1e4), help="0 is greedy.")
@click.option("--top-k", default=None, type=BoundedInt(1, MAX_TOKENS))
@click.option("--top-p", default=None, type=BoundedFloat(0.0, 1.0, low_open=True))
@click.option("--seed", default=None, type=BoundedInt(0, 2**63 - 1))
@click.option("--device", default="cpu", show_default=True, type=Device())
@click.option("--json", "as_json", is_flag=True, help='Print {"prompt_ids", "ids", "text"} per prompt.')
def generate(source, prompts, max_new_tokens, temperature, top_k, top_p, seed, device, as_json):
    """Generate text from SOURCE: a checkpoint directory, a run directory, an MLflow run
    (runs:/<id>) or an ONNX export directory (runs on onnxruntime, without torch)."""
    from gptx.sampling import Sampler

    sampler = Sampler(temperature, top_k, top_p, seed)
    if (Path(source) / "model.onnx").is_file():
        from gptx.export.runtime import OnnxGenerator

        gen = OnnxGenerator(source)
        tokenizer, context = gen.tokenizer, gen.context_length
        decode = gen.generate
    else:
        import torch

        from gptx import checkpoint
        from gptx.generate import decoding_layout, generate_ids
        from gptx.threads import choose_threads

        torch.set_num_threads(choose_threads())  # the CPUs free now (gptx.threads)
        ck = checkpoint.load(source, device=device)
        tokenizer, context = ck.tokenizer, ck.config.model.block_size
        decode = functools.partial(generate_ids, decoding_layout(ck.model), eot_id=tokenizer.eot_id, vocab=tokenizer.vocab_size)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    if any(not p for p in prompt_ids):
        raise GptxError("--prompt: a prompt must not be empty")
    if max(len(p) for p in prompt_ids) + max_new_tokens > context:
        click.echo(f"Note: the prompt and {max_new_tokens} new tokens pass the model's context of {context} tokens: "
                   f"from there on each new token sees the last {context} (nanoGPT's crop)", err=True)
    result = decode(prompt_ids, max_new_tokens, sampler)
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
def import_hf(hf_dir, out_dir):
    """Convert the Hugging Face GPT-2 or Llama model in HF_DIR (config.json + model.safetensors or
    pytorch_model.bin, and its tokenizer.json) into a gptx checkpoint that `gptx generate OUT_DIR`
    runs and training.init_from starts from."""
    from gptx.hf import import_hf as convert

    path = convert(hf_dir, out_dir, registry())
    click.echo(f"wrote {path}")

# ---- experiments ----------------------------------------------------------------------------

def _load(file, overrides):
    from gptx.config import load_experiment

    registry()  # report broken plugins before validating
    return load_experiment(file, overrides)


def show_notes(cfg) -> None:
    """What the loader changed (a dropped option, a moved key): said once everything is checked,
    so that a bad input still ends in its one error line."""
    for note in cfg.notes:
        click.echo(f"Note: {cfg.source}: {note}", err=True)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (TOML syntax); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved config as JSON.")
def validate(file, overrides, as_json):
    """Check an experiment FILE without training: every check `gptx run` makes before it creates
    anything (components, data read and tokenized, sample prompt, memory, output directory,
    tracking store)."""
    from gptx.errors import ConfigError
    from gptx.progress import StatusLine
    from gptx.training.plan import plan_run

    cfg = _load(file, overrides)
    try:
        with StatusLine() as status:  # tokenizing a cold cache takes a while
            plan = plan_run(cfg, progress=status)
    except ConfigError as err:
        raise err.located(file) from None
    cfg = plan.cfg  # resolved: dtype, vocab_size, notes, ...
    show_notes(cfg)
    if as_json:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    m, d = cfg.model, plan.dataset
    click.echo(
        f"{file}: OK — {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}; "
        + ", ".join(f"{k.name} {spec.name}" for k, spec in cfg.components() if k.name != "tokenizer")
        + f"; tokenizer {cfg.tokenizer.name} ({m.vocab_size:,} tokens); "
        f"{d.tokens('train'):,} training and {d.tokens('val'):,} validation tokens"
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
@click.option("--nproc", type=BoundedInt(1, 4096), default=None, help="Launch N processes on this machine through torchrun (DDP).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def run(file, overrides, resume, nproc, quiet):
    """Train the experiment in FILE, tracked in MLflow; print a sample at the end."""
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from gptx.errors import ConfigError
        from gptx.training.step import BatchSplit

        cfg = _load(file, overrides)  # bad input fails here, once, not in N processes
        try:
            BatchSplit.plan(cfg.training, 0, nproc)
        except ConfigError as err:
            raise err.located(file) from None
        if resume:  # a run another process still trains is refused here, once, not by rank 0 under torchrun
            from gptx import checkpoint, runs

            runs.find_resumable(cfg, checkpoint.complete_checkpoints)[1].release()  # rank 0 takes it again
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "gptx", "run", file, *[f"--set={o}" for o in overrides]]
        args += ["--resume"] * resume + ["--quiet"] * quiet
        sys.exit(_run_forwarding_signals(args))
    from gptx.training.signals import Interrupted
    from gptx.training.trainer import train

    cfg = _load(file, overrides)
    try:
        result = train(cfg, resume=resume, progress=not quiet, checked=show_notes)
    except Interrupted as err:
        click.echo(f"Stopped: {err}. Continue with: gptx run {file} --resume", err=True)
        sys.exit(err.exit_code)
    if env_int("RANK", 0) != 0:
        return
    if result.sample is not None:
        click.echo("\n---- sample ----")
        click.echo(result.sample)
        click.echo("----------------")
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    final = f" (whole validation split: {result.final_val_loss:.4f})" if result.final_val_loss is not None else ""
    click.echo(f"val loss {val}{final} after {result.step} steps, {result.tokens_per_sec:,.0f} tokens/s")
    click.echo(f"checkpoint: {result.checkpoint}")
    if (result.run_dir / "loss_curves.png").is_file():
        click.echo(f"loss curves: {result.run_dir / 'loss_curves.png'}")
    if result.run_id:
        click.echo(f"MLflow run: {result.run_id} (browse with: mlflow ui; generate with: gptx generate runs:/{result.run_id} --prompt ...)")


# ---- ONNX export -----------------------------------------------------------------------------

@cli.command("export")
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Export directory to write.")
@click.option("--opset", default=18, show_default=True, type=BoundedInt(18, 23), help="ONNX opset.")
@click.option("--quantize", default=None, metavar="int8|int4",
              help="Quantize the weights: int8 (dynamic int8 matmuls) or int4 (4-bit blocks, MatMulNBits).")
@click.option("--force", is_flag=True, help="Replace OUT even if it is a non-empty directory that is not a gptx export.")
@click.option("--track/--no-track", default=None, help="Log the export to the source's MLflow run (default: when it has one).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf", "gguf"]), default="onnx", show_default=True,
              help="onnx: model.onnx for onnxruntime; hf: a Hugging Face folder for transformers; gguf: model.gguf for llama.cpp.")
@click.option("--gguf-type", default=None, type=click.Choice(GGUF_TYPES),
              help="With --format gguf: the weights' type (default f32, exact; f16 and q8_0 are smaller).")
def export(source, out_dir, opset, quantize, force, track, fmt, gguf_type):
    """Export SOURCE (a checkpoint or run directory, or runs:/<id>) to ONNX in OUT: model.onnx with
    a KV cache, genai_config.json, tokenizer.json (where the tokenizer has one) and gptx_export.json; verified
    against PyTorch before it reports success. With --format hf: config.json, model.safetensors
    and the tokenizer files that transformers loads (GPT-2 or Llama layout). With --format gguf:
    model.gguf for llama.cpp (the same two layouts)."""
    if gguf_type is not None and fmt != "gguf":
        raise click.UsageError("--gguf-type applies to --format gguf only")
    if fmt in ("hf", "gguf"):
        if quantize is not None or track is not None:
            raise click.UsageError(f"{'--quantize' if quantize is not None else '--track'} applies to --format onnx only")
        if fmt == "hf":
            from gptx.export.hf_export import export_hf

            export_hf(source, out_dir, force=force, log=click.echo)
        else:
            from gptx.export.gguf_export import export_gguf

            export_gguf(source, out_dir, gguf_type=gguf_type or "f32", force=force, log=click.echo)
        return
    from gptx.export.onnx_export import export_checkpoint

    export_checkpoint(source, out_dir, opset=opset, quantize=quantize, force=force, track=track, log=click.echo)


class Port(click.ParamType):
    """A TCP port: an integer from 0 (any free port) to 65535."""

    name = "port"

    def convert(self, value, param, ctx):
        try:
            return parse_int(value, "--port", 0, 65535)
        except NumberError:
            self.fail(f"expected an integer from 0 (any free port) to 65535, got {value!r}", param, ctx)


class HostName(click.ParamType):
    """A host name or address as a browser sends it in Host (no port, no scheme, no path)."""

    name = "host"

    def convert(self, value, param, ctx):
        from gptx.export.server import host_name

        parsed = host_name(str(value))
        if parsed is None or parsed[1] is not None or "/" in parsed[0]:
            self.fail(f"expected a host name or address without a port, got {value!r}", param, ctx)
        return parsed[0]


@cli.command("web")
@click.argument("out_dir", required=False, type=click.Path(file_okay=True, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: this machine only).")
@click.option("--port", default=8000, show_default=True, type=Port(), help="Port to listen on; 0 picks a free one.")
@click.option("--install", is_flag=True, help="npm install the page's JavaScript packages into gptx's cache first.")
@click.option("--node-modules", default=None, type=click.Path(file_okay=False, path_type=str),
              help="A node_modules folder holding the packages (default: the web folder's, then gptx's cache).")
@click.option("--allow-host", "allow_hosts", multiple=True, type=HostName(), metavar="NAME",
              help="Also answer requests for this host name (repeatable); by default only localhost and --host.")
def web(out_dir, host, port, install, node_modules, allow_hosts):
    """Serve OUT_DIR (a gptx export) with a web page that generates in the browser (onnxruntime-web:
    WebAssembly, or WebGPU where the browser has it). Ctrl-C stops it (exit 0). With --install
    and no OUT_DIR, only installs the JavaScript packages."""
    from gptx.export import server as server_mod

    if install:
        installed = server_mod.install(log=click.echo)
        node_modules = node_modules or str(installed)
        if out_dir is None:
            click.echo(f"installed the page's JavaScript packages in {installed}")
            return
    if out_dir is None:
        raise GptxError("OUT_DIR: missing: the export folder to serve (from gptx export), or --install alone")
    server_mod.check_export(out_dir)
    modules = server_mod.find_node_modules(node_modules)
    srv = server_mod.serve(out_dir, host, port, modules, allow_hosts)

    def announce():
        click.echo(server_mod.banner(srv, out_dir, modules))
        sys.stdout.flush()

    server_mod.run_until_stopped(srv, announce)
    click.echo("stopped")


@cli.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.option("--vary", multiple=True, required=True, metavar="KEY.PATH=V1,V2,...", help="Values to try for one key; several --vary make a grid.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value in every variant.")
@click.option("--seeds", default=1, show_default=True, type=BoundedInt(1, 1000),
              help="Train every variant with N seeds: training.seed, +1, ... (the same for every variant).")
@click.option("--alpha", default=0.05, show_default=True, type=OPEN_UNIT,
              help="Mark differences to the base variant significant below this p-value (Welch's t-test).")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished sweep of this grid: finished runs are kept, "
              "an interrupted one resumes from its checkpoint, the rest train.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def sweep(base, vary, overrides, seeds, alpha, resume, as_json, quiet):
    """Train every combination of --vary values over BASE, each with --seeds seeds (one MLflow run
    each, under one parent run; one run directory each in runs/<experiment>/sweep-<timestamp>/),
    and compare them against the first variant: mean ± std of the final val loss, 95% CI, difference
    and p-value, tokens/s, wall time; loss curves in loss_curves.png."""
    from gptx import sweep as sweep_mod
    from gptx.training.signals import Interrupted

    registry()
    try:
        result = sweep_mod.sweep(Path(base), list(vary), list(overrides), seeds=seeds, alpha=alpha, progress=not quiet,
                                 resume=resume)
    except Interrupted as err:
        import shlex

        again = shlex.join(["gptx", "sweep", base, *[a for o in vary for a in ("--vary", o)],
                            *[a for o in overrides for a in ("--set", o)], *(["--seeds", str(seeds)] if seeds != 1 else []),
                            "--resume"])
        folder = getattr(err, "sweep_folder", None) or "FOLDER"
        click.echo(f"Stopped: {err}. The sweep's finished runs stay in {folder} (gptx compare {folder}); "
                   f"continue the sweep with: {again}", err=True)
        sys.exit(err.exit_code)
    _print_comparison(result, as_json)


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--alpha", default=0.05, show_default=True, type=OPEN_UNIT,
              help="Mark differences to the base group significant below this p-value (Welch's t-test).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="New (or empty) folder for compare.json and loss_curves.png [default: runs/compare-<timestamp>].")
@click.option("--tracking-uri", default=None, help="MLflow store of run ids [default: $MLFLOW_TRACKING_URI, else ./mlflow.db].")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(runs, alpha, out, tracking_uri, as_json):
    """Compare finished RUNS (run directories, sweep folders, MLflow run ids or runs:/<id>; a
    sweep's parent run id stands for its runs): grouped by the settings that differ between them
    (runs differing only in training.seed form one group), each group against the first as in
    gptx sweep: table, JSON and loss curves."""
    from gptx import compare as compare_mod

    result, warnings = compare_mod.compare(list(runs), alpha, out, tracking_uri)
    for line in warnings:
        click.echo(f"Warning: {line}", err=True)
    _print_comparison(result, as_json)


def _print_comparison(result: dict, as_json: bool) -> None:
    from gptx.compare import table

    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(table(result))
    click.echo(f"\nfolder: {result['folder']}")
    for path in result.get("plots", []):
        click.echo(f"plot: {path}")
    if result.get("parent_run_id"):
        click.echo(f"MLflow parent run: {result['parent_run_id']}")


# ---- data: prepare, eval -------------------------------------------------------------------

def _number(text: Optional[str], option: str, kind: type):
    """A number option parsed here, not by click, so a bad one is one 'Error:' line like any other."""
    if text is None:
        return None
    return parse_int(text, option, None, None) if kind is int else parse_float(text, option)  # ranges: checked where used


def _tokenizer(name: str, option_items: tuple[str, ...]):
    """The registered tokenizer NAME built with --tokenizer-option KEY=VALUE options (TOML values)."""
    from gptx.config import parse_override
    from gptx.errors import ConfigError
    from gptx.options import parse

    entry = registry().get("tokenizer", name, key="--tokenizer")
    table = {}
    for item in option_items:
        path, value = parse_override(item)
        table[".".join(path)] = value
    try:
        options = parse(entry.cls.Options, table, "--tokenizer-option")
    except ConfigError as err:
        raise GptxError(str(err)) from None
    return entry.cls(options, None)


@cli.command()
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, help="Directory for the shards and gptx_data.json (new, empty or an earlier prepare's).")
@click.option("--tokenizer", "tokenizer_name", required=True, help="A registered tokenizer: gpt2, char, byte, tiktoken, ...")
@click.option("--tokenizer-option", "tokenizer_options", multiple=True, metavar="KEY=VALUE", help="A tokenizer option (TOML value), e.g. encoding=cl100k_base.")
@click.option("--val-fraction", default="0.1", show_default=True, help="The last fraction of the tokens validates.")
@click.option("--workers", default=None, help="Tokenizing processes [default: the CPUs, 1 for small input].")
@click.option("--shard-tokens", default=str(100_000_000), show_default=True, help="Tokens per shard.")
@click.option("--force", is_flag=True, help="Replace OUT even if it holds files gptx prepare did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def prepare(source, out_dir, tokenizer_name, tokenizer_options, val_fraction, workers, shard_tokens, force, as_json,
            quiet):
    """Tokenize SOURCE (a text file, a directory of .txt files or a .jsonl file with a "text"
    field per line) into llm.c-format shards in OUT, for [data] kind = "tokens". Streaming,
    parallel, exact; OUT appears only when complete."""
    from gptx import prepare as prep
    from gptx.progress import StatusLine

    args = prep.PrepareArgs(_number(val_fraction, "--val-fraction", float), _number(workers, "--workers", int),
                            _number(shard_tokens, "--shard-tokens", int))
    args.check()  # bad numbers fail before the tokenizer loads
    tokenizer = _tokenizer(tokenizer_name, tokenizer_options)
    try:
        with prep.sigterm_raises(), StatusLine() as status:
            manifest = prep.prepare(source, out_dir, tokenizer_name, tokenizer, args, None if quiet else status, force)
    except prep.Terminated as err:
        fail(f"{out_dir}: stopped by SIGTERM " + ("after the output was written" if err.published else
                                                  "before the output was complete; nothing was written there"), 143)
    except KeyboardInterrupt:
        fail(f"{out_dir}: interrupted; nothing was written there", 130)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    counts = ", ".join(f"{manifest['tokens'][s]:,} {s} tokens in {len(manifest['shards'][s])} shard(s)" for s in ("train", "val"))
    click.echo(f"wrote {out_dir}: {counts} ({manifest['dtype']}, tokenizer {tokenizer_name} of "
               f"{manifest['vocab_size']:,} tokens); "
               f'train on it with [data] kind = "tokens", path = "{out_dir}"')


@cli.command("eval")
@click.argument("source")
@click.option("--data", "data", default=None, help="A text file: loss, perplexity and bits per byte over all of it.")
@click.option("--task", "task", default=None, help="A HellaSwag-format .jsonl (ctx, endings, label): acc and acc_norm.")
@click.option("--stride", default=None, help="Overlapping windows advancing this many tokens [default: the context].")
@click.option("--harness", default=None, metavar="TASK[,TASK]",
              help="lm-evaluation-harness tasks instead (needs pip install 'gptx[eval]').")
@click.option("--include-path", default=None, metavar="DIR", help="With --harness: a folder of lm-eval task YAMLs.")
@click.option("--num-fewshot", default=None, metavar="N", help="With --harness: few-shot examples per prompt [default: each task's].")
@click.option("--limit", default=None, metavar="N", help="With --harness: at most this many examples per task.")
@click.option("--batch-size", "--batch", "batch", default=None, help="Windows (rows) per forward pass [default: by memory].")
@click.option("--device", default="cpu", show_default=True, type=Device())
@click.option("--kv-cache", "kv_cache", default=None, type=click.Choice(["float", "int8"]),
              help="Score token by token through the causal attention's KV cache in this format, as decoding "
                   "sees the text (int8: its quantised cache) [default: all positions at once, no cache].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(source, data, task, stride, harness, include_path, num_fewshot, limit, batch, device, kv_cache, as_json):
    """Evaluate SOURCE (a checkpoint or run directory, runs:/<id>, or an ONNX export directory,
    which runs on onnxruntime alone): --data FILE and/or --task FILE.jsonl. With runs:/<id> the
    results are also logged to that MLflow run as eval/<file>/<metric>. With --harness, lm-eval's
    tasks instead; SOURCE may then also be a `gptx export --format hf` folder (lm-eval's hf backend)."""
    batch = _number(batch, "--batch-size", int)
    if harness is not None and kv_cache is not None:
        fail("--kv-cache: applies to --data and --task; lm-eval's harness scores whole sequences")
    if harness is not None:
        _harness_eval(source, harness, (data, task, stride), include_path, _number(num_fewshot, "--num-fewshot", int),
                      _number(limit, "--limit", int), batch, device, as_json)
        return
    for option, value in (("--include-path", include_path), ("--num-fewshot", num_fewshot), ("--limit", limit)):
        if value is not None:
            fail(f"{option}: applies to --harness TASKS only")
    from gptx.evaluate import evaluate as run_eval
    from gptx.evaluate import table
    from gptx.progress import StatusLine

    with StatusLine() as status:  # tokenizing a big --data file, long tasks
        results = run_eval(source, data, task, _number(stride, "--stride", int), batch, device, status, kv_cache)
    if as_json:
        flat = {"source": source}
        for part in results.values():
            flat |= {k: v for k, v in part.items() if k != "file"}
        click.echo(json.dumps(flat))
    else:
        click.echo(table(results))


def _harness_eval(source, harness, own_options, include_path, num_fewshot, limit, batch, device, as_json):
    """``gptx eval --harness``: lm-eval's tasks (gptx.harness.run); lm-eval is an optional extra."""
    for option, value in zip(("--data", "--task", "--stride"), own_options):
        if value is not None:
            fail(f"{option}: cannot be combined with --harness (run gptx eval twice)")
    try:
        from gptx.harness import run
    except ImportError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        fail("gptx eval --harness needs lm-eval: pip install 'gptx[eval]'")
    result = run.evaluate(source, harness, include_path, num_fewshot, limit, batch, device)
    click.echo(json.dumps(result) if as_json else run.table(result))


# ---- bench ----------------------------------------------------------------------------------

@cli.command()
@click.option("--only", default="peak,train,generate", show_default=True, metavar="SECTIONS",
              help="Comma-separated sections: peak, train, generate, busy (training beside busy processes), "
                   "speedrun (time to nanoGPT's quality; minutes), startup (gptx run to its first step).")
@click.option("--experiment", type=click.Path(dir_okay=False), default=None,
              help="Experiment file for the train section (default: the shipped shakespeare_char.toml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value of the experiment; repeatable.")
@click.option("--train-steps", default=50, show_default=True, type=BoundedInt(1, 1 << 20), help="Timed training steps.")
@click.option("--warmup-steps", default=5, show_default=True, type=BoundedInt(0, 1 << 20), help="Untimed steps first (compile, caches).")
@click.option("--model", "model_size", default="tiny", show_default=True, type=click.Choice(["tiny", "gpt2"]),
              help="Randomly initialised model for the generate section: tiny (4x128) or gpt2 (124M).")
@click.option("--checkpoint", "checkpoint_dir", default=None, help="Generate with this checkpoint instead of a random model.")
@click.option("--backends", default="torch,torch-kv8,ort,ort-int8,ort-int4,hf,genai,genai-int4,node,web", show_default=True,
              help="Generation backends (hf, genai and node when installed; web: the page in headless Chromium, "
                   "when Playwright, Chromium ($GPTX_CHROMIUM) and gptx web --install's packages are there).")
@click.option("--prompt-tokens", default=32, show_default=True, type=BoundedInt(1, MAX_TOKENS))
@click.option("--new-tokens", default=128, show_default=True, type=BoundedInt(1, MAX_TOKENS))
@click.option("--repeats", default=3, show_default=True, type=BoundedInt(1, 10_000), help="Timed generations per backend; gptx runs of the startup section.")
@click.option("--peak-seconds", default=1.0, show_default=True, type=BoundedFloat(0.01, 3600.0), help="Time per matmul peak.")
@click.option("--threads", default=None, type=BoundedInt(1, 4096),
              help="torch/onnxruntime threads (default: gptx's choice, the CPUs free; see docs/performance.md).")
@click.option("--busy", default=1, show_default=True, type=BoundedInt(1, 64), help="Busy processes beside the busy section's runs.")
@click.option("--speedrun-seeds", default=3, show_default=True, type=BoundedInt(1, 100), help="Seeds per speedrun recipe.")
@click.option("--speedrun-steps", default=None, type=BoundedInt(1, 1 << 20),
              help="Cap both speedrun recipes at this many steps (a smoke test; the comparison needs their own).")
@click.option("--nanogpt", default=None, metavar="DIR", help="A nanoGPT checkout (data/shakespeare_char prepared): time it too.")
@click.option("--speedrun-set", "speedrun_overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a value of the speedrun recipe alone (an ablation's row); repeatable.")
@click.option("--quality-data", default=None, metavar="FILE",
              help="Held-out text the generate section scores each export on (perplexity vs fp32) "
                   "[default: the last 16 KiB of the shipped Shakespeare].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--deploy-table", "deploy_table", default=None, metavar="FILE",
              help="Print the deployment table (markdown) of a saved `gptx bench --only generate --json` output; measures nothing.")
def bench(only, experiment, overrides, train_steps, warmup_steps, model_size, checkpoint_dir, backends,
          prompt_tokens, new_tokens, repeats, peak_seconds, threads, busy, speedrun_seeds, speedrun_steps, nanogpt,
          speedrun_overrides, quality_data, as_json, deploy_table):
    """Measure this machine: matmul peak, training tokens/s and MFU, generation tokens/s, time to
    first token and memory (PyTorch, onnxruntime fp32/int8/int4, HF and onnxruntime-genai as peers,
    the web page in headless Chromium)."""
    from gptx import bench as bench_mod

    if deploy_table is not None:
        click.echo(bench_mod.deploy_table(bench_mod.read_saved(deploy_table)))
        return
    registry()
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    result = bench_mod.run(
        sections=split(only), experiment=experiment, overrides=tuple(overrides),
        train_steps=train_steps, warmup_steps=warmup_steps, model=model_size, checkpoint_dir=checkpoint_dir,
        backends=split(backends), prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
        peak_seconds=peak_seconds, threads=threads, log=lambda s: click.echo(s, err=True) if not as_json else None,
        speedrun_seeds=speedrun_seeds, speedrun_steps=speedrun_steps, nanogpt=nanogpt, busy=busy,
        quality_data=quality_data, speedrun_overrides=tuple(speedrun_overrides),
    )
    click.echo(json.dumps(result, indent=2) if as_json else bench_mod.table(result))


def main():
    cli(prog_name="gptx")


if __name__ == "__main__":
    main()
