"""The GPU benchmark in one command: tunesmith beside TRL and Unsloth on one shape, one JSON line per run.

    python benchmarks/gpu/run.py --shape tinyllama --method qlora --baselines ../shared/bench --tokenizer TOK
    python benchmarks/gpu/run.py --shape llama8b --baselines ../shared/bench --tokenizer TOK

The same as ``tunesmith bench`` (``src/tunesmith/bench.py`` has the runs, the token counts and the MFU formula),
kept here so the benchmarks directory holds every measurement's entry point.
"""

import sys

from tunesmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
