"""Run a Python program (`peak_rss.py -m module args...`, `peak_rss.py -c CODE` or
`peak_rss.py script.py args...`) and print
its peak resident set size on stderr at exit as PEAK_RSS_BYTES=N (bench_process.py reads it)."""

import atexit
import resource
import runpy
import sys


def _report():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # VmHWM: this process's own high-water mark (ru_maxrss can be coarse in sandboxes)
        with open("/proc/self/status") as fh:
            peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    print(f"PEAK_RSS_BYTES={peak}", file=sys.stderr)
    try:  # what is resident at exit, by kind: anonymous (heap, pinned buffers) vs file-backed (libraries)
        with open("/proc/self/status") as fh:
            split = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh
                     if line.startswith(("RssAnon:", "RssFile:", "RssShmem:"))}
        print("RSS_AT_EXIT " + " ".join(f"{k}={v}" for k, v in split.items()), file=sys.stderr)
    except (OSError, ValueError, IndexError):
        pass


atexit.register(_report)
if sys.argv[1] == "-c":  # peak_rss.py -c CODE: a one-liner, as `python -c`
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
elif sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
