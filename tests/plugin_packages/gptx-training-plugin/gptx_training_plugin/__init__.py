"""Example gptx training plugin (see plugin.py)."""
