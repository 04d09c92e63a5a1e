"""An example gptx plugin package (see ``plugin.py``)."""
