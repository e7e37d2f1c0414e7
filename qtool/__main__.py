"""`python -m qtool` (what `accelerate launch -m qtool ...` runs in each process)."""

from qtool.cli.app import main

if __name__ == "__main__":
    main()
