"""``quality.py`` with ``--model smollm2`` as the default: the commands in
``benchmarks/results/quality-smollm2.md`` and ``defaults-evidence.md`` ran under this name."""
from quality import main

if __name__ == "__main__":
    main(default_model="smollm2")
