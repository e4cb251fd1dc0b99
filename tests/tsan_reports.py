"""python tests/tsan_reports.py LOG...: sorts ThreadSanitizer's reports (tests/sanitize.sh thread) and fails on a
race it can judge.

Left aside, with their count: reports with an OpenMP team thread in them (libgomp's synchronisation is invisible
to TSan, so ATen's parallel regions, and ours inside an OpenMpScope, all look racy) and the teardown of a
finished thread's TLS (glibc frees it in the next pthread_create; Python joins its threads through a lock TSan
does not connect to the exit). Every other report is printed, once per distinct top of stack, and the exit
status is 1 if there is any."""

import collections
import os
import re
import sys

OPENMP = ("gomp_", "GOMP_", "._omp_fn.", "invoke_parallel")
TLS_TEARDOWN = "_dl_deallocate_tls"


def reports(paths):
    for path in paths:  # TSan writes no log when it has nothing to report (the shell passes the glob itself)
        if not os.path.exists(path):
            continue
        with open(path, errors="replace") as f:
            for chunk in f.read().split("==================\n"):
                if "WARNING: ThreadSanitizer" in chunk:
                    yield chunk


def main(paths) -> int:
    kinds, judged = collections.Counter(), {}
    for report in reports(paths):
        if any(mark in report for mark in OPENMP):
            kinds["with an OpenMP team thread (not judged)"] += 1
        elif TLS_TEARDOWN in report:
            kinds["thread-exit TLS teardown (not judged)"] += 1
        else:
            kinds["judged: a race among our pool, its callers and Python threads"] += 1
            top = tuple(re.sub(r"^\s*#\d+ ", "", line)[:160] for line in report.splitlines() if re.match(r"\s+#[0-2] ", line))
            judged.setdefault(top, report)
    print(f"ThreadSanitizer: {sum(kinds.values())} reports in {sum(map(os.path.exists, paths))} log(s)")
    for kind, n in sorted(kinds.items()):
        print(f"  {n:6d}  {kind}")
    for report in judged.values():
        print("==================\n" + report)
    return 1 if judged else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
