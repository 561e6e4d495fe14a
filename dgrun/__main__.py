"""`python -m dgrun` (also what torchrun / accelerate launch run)."""

from dgrun.cli import main

if __name__ == "__main__":
    main()
