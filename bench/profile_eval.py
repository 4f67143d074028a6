"""Profile one tokenwise-precision command in this process: cProfile of the main thread, imports
included, the top functions by cumulative and by own time written to a text file.

    python bench/profile_eval.py --out FILE -- eval_fake --model_dir=M --xy_path=C ...

(The console script exits through os._exit, which would skip the profile's output; this calls
cli.main directly.) Worker threads (chunk readers, decomposition prefetch) are not profiled:
the main thread's waits on them show where it blocks.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def main() -> int:
    cut = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="the text file the profile goes to")
    mine = parser.parse_args(sys.argv[1:cut])
    args = sys.argv[cut + 1:]
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    from tokenwise_harness import cli

    rc = cli.main(args)
    prof.disable()
    seconds = time.perf_counter() - t
    text = io.StringIO()
    text.write(f"{' '.join(args)}\nrc {rc}, {seconds:.2f} s in cli.main (imports included)\n\n")
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    with open(mine.out, "w") as fh:
        fh.write(text.getvalue())
    return rc or 0


if __name__ == "__main__":
    raise SystemExit(main())
