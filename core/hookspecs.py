"""The hooks a gptx plugin may implement.

Every component hook hands the plugin a ``register`` callback and nothing else:

    register(name: str, cls: type, *, override: bool = False)

``cls`` must subclass the interface of that kind (``gptx.components``). A name already
registered by another plugin is an error unless exactly one of them passes ``override=True``;
that one wins, whatever the load order. The built-in components are plugins themselves,
registered ``trylast``, so a third-party package can override any of them.

Implement a hook with ``@gptx.hookimpl`` on a module-level function of the same name, and
expose the module through the ``gptx`` entry-point group in your package's pyproject.toml:

    [project.entry-points.gptx]
    my_plugin = "my_package.plugin"
"""
import pluggy

hookspec = pluggy.HookspecMarker("gptx")


@hookspec
def register_attention(register):
    """Register attention implementations (subclasses of ``gptx.components.Attention``),
    selected by ``[model.attention] kind = "<name>"``."""


@hookspec
def register_positional(register):
    """Register positional encodings (subclasses of ``gptx.components.PositionalEncoding``),
    selected by ``[model.positional] kind = "<name>"``."""


@hookspec
def register_ffn(register):
    """Register feed-forward networks (subclasses of ``gptx.components.FeedForward``),
    selected by ``[model.ffn] kind = "<name>"``."""


@hookspec
def register_norm(register):
    """Register normalisation layers (subclasses of ``gptx.components.Norm``),
    selected by ``[model.norm] kind = "<name>"``."""


@hookspec
def register_norm_placement(register):
    """Register norm placements (subclasses of ``gptx.components.NormPlacement``),
    selected by ``[model.norm] placement = "<name>"``."""


@hookspec
def register_tokenizer(register):
    """Register tokenizers (subclasses of ``gptx.components.Tokenizer``),
    selected by ``[tokenizer] kind = "<name>"``."""


@hookspec
def register_commands(cli):
    """Add commands to the ``gptx`` command line: ``cli`` is the root ``click.Group``;
    call ``cli.command()`` / ``cli.add_command(...)`` on it."""
