"""The records of a GPU visit: scripts/gpu-check.sh turns each step's output into raw JSON
records with this script (standard library only: it runs on the device's python3).

Every record is one JSON object a line, appended to $KIT_RESULTS, with
  kind     gpu-tests | sanitizer | mura-bench | pytorch-bench | kernel | ncu | info
  card, driver, commit, call   from $KIT_CARD, $KIT_DRIVER, $KIT_COMMIT, $KIT_CALL
  date     when the record was made (UTC, ISO 8601)
and its own figures (see each command). Each command prints one line saying what it recorded
and exits 0 when the step passed, 1 when it failed (2: bad arguments).

  gpu_kit.py json KIND FILE [KEY=VALUE...]     each JSON object line of FILE (mura bench --json,
                                               pytorch_bench.py, bench-kernels --jsonl), with the
                                               extra fields (a FILE without one is recorded as
                                               its last line, "error"); fails then, on a record
                                               with "error", or on an extra status=N not 0
  gpu_kit.py text KIND KEY FILE [STATUS]       FILE's lines as the record's KEY (the info stage's
                                               nvidia-smi and mura info); fails on a STATUS not 0
  gpu_kit.py tests BINARY LOG SECONDS STATUS   a libtest run: binary, passed, failed, ignored,
                                               failed_tests, seconds, status
  gpu_kit.py sanitizer TOOL BINARY LOG SECONDS STATUS
                                               compute-sanitizer over a test binary: tool,
                                               errors, and the tests' passed and failed
  gpu_kit.py ncu-kernels EMU_JSONL             prints the probe's kernels as an ncu regex
  gpu_kit.py ncu-metrics core|extra            prints a metric list for `ncu --metrics`
  gpu_kit.py ncu EMU_JSONL CSV...              one record per kernel and metric: ncu (from the
                                               CSVs of `ncu --csv`), emu (the emulator's count
                                               of the same launch), what
  gpu_kit.py summary RESULTS CALL              a table of the call's figures (the reply's tail)
"""

import csv
import datetime
import json
import os
import re
import sys

# The metrics the issue asks for, which every recent ncu has on sm_80-sm_90; the others of the
# emulator's profile are read in a second pass, so that one unknown name cannot lose these.
NCU_CORE = [
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
]
NCU_EXTRA = [
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",
    "smsp__inst_executed_op_shared_ld.sum",
    "smsp__inst_executed_op_shared_st.sum",
    "smsp__inst_executed_op_ldsm.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ldsm.sum",
    "smsp__inst_executed_pipe_tensor_op_hmma.sum",
]


def common():
    return {
        "card": os.environ.get("KIT_CARD", "unknown"),
        "driver": os.environ.get("KIT_DRIVER", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": os.environ.get("KIT_COMMIT", "unknown"),
        "call": os.environ.get("KIT_CALL", "unlabelled"),
    }


def append(kind, fields):
    rec = {"kind": kind, **common(), **fields}
    path = os.environ.get("KIT_RESULTS")
    if not path:
        raise SystemExit("gpu_kit: KIT_RESULTS is not set (the file records are appended to)")
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def json_lines(path):
    out = []
    for line in read_text(path).splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def value(text):
    """A KEY=VALUE's value: JSON when it parses (numbers, true, null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_json(kind, path, *extra):
    fields = {}
    for kv in extra:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"gpu_kit: '{kv}' is not KEY=VALUE")
        fields[k] = value(v)
    objs = json_lines(path) if os.path.exists(path) else []
    if not objs:  # a step that printed no record is recorded as what it said last
        lines = [l for l in read_text(path).splitlines() if l.strip()] if os.path.exists(path) else []
        rec = append(kind, {**fields, "error": lines[-1] if lines else f"{path}: no output"})
        print(f"{kind}: no JSON record: {rec['error']}")
        return 1
    bad = fields.get("status", 0) != 0
    recs = [append(kind, {**obj, **fields}) for obj in objs]
    bad |= any("error" in r for r in recs)
    if len(recs) > 4:
        print(f"{kind}: {len(recs)} records, the first: {brief(recs[0])}")
    else:
        for r in recs:
            print(f"{kind}: {brief(r)}")
    return 1 if bad else 0


def cmd_text(kind, key, path, status="0"):
    lines = read_text(path).splitlines()
    append(kind, {key: lines, "status": int(status)})
    print(f"{kind}: {key}, {len(lines)} lines" + ("" if status == "0" else f", status {status}"))
    return 0 if status == "0" and lines else 1


def brief(r):
    """One line of a record's main figures."""
    keys = ["mode", "op", "pass", "shape", "precision", "batch", "image_size", "graphs",
            "images_per_s", "step_ms", "train_step_s", "peak_mem_bytes", "peak_device_bytes",
            "measured_s", "floor_s", "oom", "error"]
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    return ", ".join(f"{k} {show(r[k])}" for k in keys if k in r)


# libtest's lines: "test a::b ... ok", "test a::b ... FAILED", "test result: ok. 3 passed; ..."
TEST_LINE = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", re.M)
RESULT = re.compile(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored")


def libtest(text):
    outcomes = TEST_LINE.findall(text)
    failed_tests = [name for name, o in outcomes if o == "FAILED"]
    m = RESULT.search(text)
    if m:
        passed, failed, ignored = (int(g) for g in m.groups())
    else:  # killed before the summary: count the lines it printed
        passed = sum(o == "ok" for _, o in outcomes)
        failed, ignored = len(failed_tests), sum(o == "ignored" for _, o in outcomes)
    return {"passed": passed, "failed": failed, "ignored": ignored,
            "failed_tests": failed_tests, "finished": m is not None}


def run_fields(binary, seconds, status):
    status = int(status)
    return {"binary": binary, "seconds": float(seconds), "status": status,
            "timed_out": status in (124, 137)}


def cmd_tests(binary, log, seconds, status):
    rec = append("gpu-tests", {**run_fields(binary, seconds, status), **libtest(read_text(log))})
    ok = rec["status"] == 0 and rec["failed"] == 0 and rec["passed"] > 0 and rec["finished"]
    timed = " (timed out)" if rec["timed_out"] else ""
    print(f"{binary}: {rec['passed']} passed, {rec['failed']} failed{timed}"
          + (f": {' '.join(rec['failed_tests'])}" if rec["failed_tests"] else ""))
    return 0 if ok else 1


SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACE = re.compile(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?")


def cmd_sanitizer(tool, binary, log, seconds, status):
    text = read_text(log)
    counts = [int(n) for n in SUMMARY.findall(text) + RACE.findall(text)]
    rec = append("sanitizer", {"tool": tool, **run_fields(binary, seconds, status),
                               "errors": max(counts) if counts else None, **libtest(text)})
    ok = rec["errors"] == 0 and rec["status"] == 0 and rec["failed"] == 0 and rec["passed"] > 0
    said = "no summary" if rec["errors"] is None else f"{rec['errors']} errors"
    print(f"{tool} over {binary}: {said}, tests {rec['passed']} passed, {rec['failed']} failed")
    return 0 if ok else 1


def cmd_ncu_kernels(emu):
    names = [r["kernel"] for r in json_lines(emu)]
    if not names:
        print("gpu_kit: no kernels in " + emu, file=sys.stderr)
        return 1
    print("regex:^(" + "|".join(names) + ")$")
    return 0


def cmd_ncu_metrics(which):
    lists = {"core": NCU_CORE, "extra": NCU_EXTRA}
    if which not in lists:
        raise SystemExit("gpu_kit: ncu-metrics core|extra")
    print(",".join(lists[which]))
    return 0


def number(text):
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def ncu_values(path):
    """{kernel: {metric: value}} from `ncu --csv` output (the raw page: one row per launch and a
    column per metric; or the details page: one row per launch and metric), summed over a
    kernel's launches. ncu's own lines (==PROF==, ==WARNING==) are skipped."""
    rows = [r for r in csv.reader(l for l in read_text(path).splitlines()
                                  if l.strip() and not l.startswith("=="))]
    head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if head is None:
        return {}
    cols = rows[head]
    kcol = cols.index("Kernel Name")
    out = {}

    def add(kernel, metric, v):
        if v is not None:
            k = kernel.split("(")[0].strip()
            out.setdefault(k, {})[metric] = out.get(k, {}).get(metric, 0) + v

    for r in rows[head + 1:]:
        if len(r) != len(cols):
            continue
        if "Metric Name" in cols:
            add(r[kcol], r[cols.index("Metric Name")], number(r[cols.index("Metric Value")]))
        else:
            for i, c in enumerate(cols):
                if c in NCU_CORE or c in NCU_EXTRA:
                    add(r[kcol], c, number(r[i]))  # (the units row has no numbers)
    return out


def cmd_ncu(emu, *csvs):
    probes = json_lines(emu)
    measured = {}
    for path in csvs:
        if os.path.exists(path):
            for k, ms in ncu_values(path).items():
                measured.setdefault(k, {}).update(ms)
    found = 0
    for p in probes:
        for metric, count in sorted(p.get("emu", {}).items()):
            got = measured.get(p["kernel"], {}).get(metric)
            found += got is not None
            append("ncu", {"kernel": p["kernel"], "what": p.get("what"), "metric": metric,
                           "ncu": got, "emu": count})
    total = sum(len(p.get("emu", {})) for p in probes)
    print(f"ncu: {found} of {total} metrics read on the card, recorded beside the emulator's")
    core = all(measured.get(p["kernel"], {}).get(m) is not None for p in probes for m in NCU_CORE)
    return 0 if probes and core else 1


def cmd_summary(results, call):
    recs = [r for r in json_lines(results) if r.get("call") == call]
    print(f"== call {call}: {len(recs)} records in {results}")
    for r in recs:
        k = r["kind"]
        if "error" in r:
            print(f"  {k:13} {r.get('step', '')} error: {r['error']}")
        elif k in ("gpu-tests", "sanitizer"):
            tool = f"{r['tool']} " if k == "sanitizer" else ""
            errs = f", {r['errors']} sanitizer errors" if k == "sanitizer" else ""
            print(f"  {k:13} {tool}{r['binary']}: {r['passed']} passed, {r['failed']} failed{errs}")
        elif k in ("mura-bench", "pytorch-bench"):
            print(f"  {k:13} {brief(r)}")
    kernels = [r for r in recs if r["kind"] == "kernel" and "error" not in r]
    timed = [r for r in kernels if r.get("measured_s")]
    if kernels:
        step = sum(r["count"] * r["measured_s"] for r in timed)
        floor = sum(r["count"] * r["floor_s"] for r in timed)
        print(f"  kernel        {len(timed)} of {len(kernels)} rows timed: {step * 1e3:.3f} ms per "
              f"step, floor {floor * 1e3:.3f} ms ({100 * floor / step if step else 0:.0f}% of it)")
    ncu = [r for r in recs if r["kind"] == "ncu" and r.get("ncu") is not None]
    if ncu:
        same = sum(r["ncu"] == r["emu"] for r in ncu)
        print(f"  ncu           {len(ncu)} counts read, {same} equal to the emulator's")
    benches = [r for r in recs if r["kind"] in ("mura-bench", "pytorch-bench") and r.get("images_per_s")]
    for m in (r for r in benches if r["kind"] == "mura-bench"):
        for t in (r for r in benches if r["kind"] == "pytorch-bench" and r["batch"] == m["batch"]):
            mem = ""
            if m.get("peak_device_bytes") and t.get("peak_mem_bytes"):
                mem = f", {m['peak_device_bytes'] / t['peak_mem_bytes']:.2f}x peak memory"
            graphs = "" if m.get("graphs", True) else " no graphs"
            print(f"  ratio mura {m['precision']}{graphs} b{m['batch']} / torch {t['mode']}: "
                  f"{m['images_per_s'] / t['images_per_s']:.2f}x images/s{mem}")
    return 0


COMMANDS = {"json": cmd_json, "text": cmd_text, "tests": cmd_tests, "sanitizer": cmd_sanitizer,
            "ncu-kernels": cmd_ncu_kernels, "ncu-metrics": cmd_ncu_metrics, "ncu": cmd_ncu,
            "summary": cmd_summary}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](*argv[1:])
    except TypeError as e:
        print(f"gpu_kit: {argv[0]}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gpu_kit: {argv[0]}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
