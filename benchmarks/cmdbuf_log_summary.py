"""Summarizes XLA's command-buffer log (``TF_CPP_VMODULE=command_buffer_thunk=3``): how
often each command buffer (told apart by its number of commands) was executed and
updated, how long the updates took and how many buffer allocations had moved.

  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 python3 bench.py 2>log
  python3 benchmarks/cmdbuf_log_summary.py log

The log is cut at each of the benchmark's JSON rows and "# " progress lines (bench_finetune
prints one before each timed loop); each part is summarized apart, under the line that ends
it; parts with nothing logged are left out.
"""

from __future__ import annotations

import argparse
import collections
import re

UPDATE = re.compile(r"Update command buffer.*num_commands=(\d+).*updated_allocs=(\d+)")
UPDATED = re.compile(r"Updated command buffer in (\d+) \S+; num_commands=(\d+)")
INITIALIZED = re.compile(r"Initialized command buffer on device.* in (\d+) \S+; num_commands=(\d+)")
# "on device ..." in older XLA, "; num_executions=..." in jaxlib 0.11.2.
EXECUTE = re.compile(r"Execute command buffer( on device|;)")
# A new executable evicts every other's command buffers; they are recorded afresh.
EVICTED = re.compile(r"Evicted (\d+) command buffer")


def summarize(lines):
    """Yields (the line that ends a part, its executions, {num_commands: counts}) per part."""
    stats = collections.defaultdict(lambda: collections.Counter())
    executes = 0
    for line in lines:
        if line.startswith(("{", "# ")):
            yield line.strip()[:100], executes, dict(stats)
            stats, executes = collections.defaultdict(lambda: collections.Counter()), 0
        elif match := UPDATE.search(line):
            commands, allocs = map(int, match.groups())
            stats[commands]["updates"] += 1
            stats[commands]["updated_allocs"] += allocs
        elif match := UPDATED.search(line):
            micros, commands = map(int, match.groups())
            stats[commands]["update_us"] += micros
        elif match := INITIALIZED.search(line):
            micros, commands = map(int, match.groups())
            stats[commands]["inits"] += 1
            stats[commands]["init_us"] += micros
        elif match := EVICTED.search(line):
            stats["evicted"]["evicted"] += int(match.group(1))
        elif EXECUTE.search(line):
            executes += 1
    yield "(after the last row)", executes, dict(stats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        for variant, executes, stats in summarize(f):
            if not executes and not stats:
                continue
            evicted = stats.pop("evicted", {}).get("evicted", 0)
            updates = sum(c["updates"] for c in stats.values())
            micros = sum(c["update_us"] for c in stats.values())
            inits = sum(c["inits"] for c in stats.values())
            init_ms = sum(c["init_us"] for c in stats.values()) / 1e3
            print(
                f"== up to {variant}: {executes} executions, {updates} updates, "
                f"{micros / 1e3:.1f} ms; {inits} recordings, {init_ms:.1f} ms; {evicted} evicted"
            )
            for commands, c in sorted(stats.items(), key=lambda kv: -kv[1]["update_us"])[:12]:
                mean_allocs = c["updated_allocs"] / max(c["updates"], 1)
                print(
                    f"   {commands:6d} commands: {c['updates']:4d} updates, "
                    f"{c['update_us'] / 1e3:8.1f} ms, {mean_allocs:.1f} allocations moved"
                )


if __name__ == "__main__":
    main()
