"""``python -m lightning_moe``: the same as the ``lightning-moe`` command."""

from lightning_moe.cli import main

if __name__ == "__main__":
    main()
