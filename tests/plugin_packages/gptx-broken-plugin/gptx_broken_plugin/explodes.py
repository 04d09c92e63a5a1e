"""Importing this plugin fails, as a plugin whose own dependency is missing would."""
raise ImportError("gptx_broken_plugin needs the 'frobnicate' package, which is not installed")
