"""A typo in a hook name: gptx must reject it (pluggy's check_pending), not ignore it silently."""
import gptx
from gptx.components import FeedForward


class Never(FeedForward):
    def forward(self, x):
        return x


@gptx.hookimpl
def register_fnn(register):  # should be register_ffn
    register("never", Never)
