"""`python -m tracking` / `torchrun --nproc-per-node N -m tracking fit ...`: the same CLI as `tritonsplat-track`."""

from .cli import main

if __name__ == "__main__":
    main()
