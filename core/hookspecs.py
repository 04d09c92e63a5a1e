"""The hooks a gptx plugin may implement.

One component hook per kind in ``gptx.kinds.KINDS`` (``register_attention``,
``register_positional``, ``register_ffn``, ``register_norm``, ``register_block``,
``register_norm_placement``, ``register_tokenizer``, ``register_dataset``,
``register_optimizer``, ``register_schedule``). Each hands the plugin a ``register`` callback
and nothing else:

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

from gptx.kinds import KINDS

hookspec = pluggy.HookspecMarker("gptx")


def _component_hook(kind):
    def hook(register):
        pass

    hook.__name__ = hook.__qualname__ = kind.hook
    where = f'``[{kind.table}] kind = "<name>"``' if kind.table else "name in another component's options"
    hook.__doc__ = (f"Register {kind.name} components: {kind.doc}. Subclasses of "
                    f"``gptx.components.{kind.interface}``, selected by {where}.")
    return hookspec(hook)


for _kind in KINDS:
    globals()[_kind.hook] = _component_hook(_kind)


@hookspec
def register_commands(cli):
    """Add commands to the ``gptx`` command line: ``cli`` is the root ``click.Group``;
    call ``cli.command()`` / ``cli.add_command(...)`` on it."""
