"""Example gptx model plugin (see plugin.py)."""
