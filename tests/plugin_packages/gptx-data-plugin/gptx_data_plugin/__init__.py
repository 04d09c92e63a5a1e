"""Example gptx dataset plugin (see plugin.py)."""
