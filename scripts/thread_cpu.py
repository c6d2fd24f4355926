#!/usr/bin/env python3
"""Per-thread CPU of a process over an interval, and the host's busy cores (Linux /proc).

    thread_cpu.py snap PID FILE          # record the process's threads and /proc/stat
    thread_cpu.py diff PID FILE [TOP]    # since FILE: each thread's CPU as % of one core,
                                         # the busiest TOP (default 8), and the host's busy cores

Used by scripts/serve-device-check.sh (THREADS=1) to find a thread that holds the server back:
one at ~100% while the host has idle cores is a serial stage."""
import json, os, sys, time


def threads(pid):
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            raw = open(f"{base}/{tid}/stat").read()
        except OSError:
            continue
        # comm may hold spaces: it ends at the last ')'.
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        f = raw[raw.rindex(")") + 2:].split()
        out[tid] = (name, int(f[11]) + int(f[12]))  # utime + stime, clock ticks
    return out


def host():
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + v[4]
    return sum(v[:8]), idle


def main():
    cmd, pid, path = sys.argv[1], sys.argv[2], sys.argv[3]
    if cmd == "snap":
        json.dump({"t": time.monotonic(), "threads": threads(pid), "host": host()}, open(path, "w"))
        return
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    a = json.load(open(path))
    dt = time.monotonic() - a["t"]
    tck = os.sysconf("SC_CLK_TCK")
    now = threads(pid)
    rows = []
    for tid, (name, ticks) in now.items():
        before = a["threads"].get(tid, (name, 0))[1]
        rows.append(((ticks - before) / tck / dt * 100, tid, name))
    rows.sort(reverse=True)
    total, idle = host()
    t0, i0 = a["host"]
    busy = (total - t0 - (idle - i0)) / max(total - t0, 1) * os.cpu_count()
    srv = sum(r[0] for r in rows) / 100
    print(f"  server threads over {dt:.1f} s: {srv:.2f} cores in all; host busy {busy:.2f} of {os.cpu_count()} cores "
          f"(the server's {srv:.2f}, everything else {busy - srv:.2f})")
    print("  busiest: " + ", ".join(f"{name}[{tid}] {pct:.0f}%" for pct, tid, name in rows[:top]))


if __name__ == "__main__":
    main()
