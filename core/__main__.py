"""``python -m gptx`` (used by torchrun, which launches modules)."""
from gptx.cli import main

if __name__ == "__main__":
    main()
