"""The experiment files shipped with gptx and their data (tiny Shakespeare). A package only so
that a wheel install carries them: ``importlib.resources.files("gptx.experiments")``."""
