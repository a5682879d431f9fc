"""`python -m desktune` (what `torchrun -m desktune train CONFIG` and `desktune train --nproc N` start)."""

from desktune.cli import main

if __name__ == "__main__":
    main()
