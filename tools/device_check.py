"""Helper of tools/device_check.sh (run it, not this): build a preset's project, then compare the runs.

  python tools/device_check.py make DEST PRESET        # PRESET: toy | toy-small | smollm2-reduced
  python tools/device_check.py report RUNS_TSV REPORT_JSON

`make` copies this checkout into DEST with tests/projects.py's make_project (re-locked eval set, re-fixed
preregistration, one commit). toy: params.yaml as it is (the committed default on a clean checkout);
toy-small: tests/projects.py's SMALL overrides; smollm2-reduced: configs/smollm2-135m-instruct.yaml merged
with tests/test_smollm2.py's REDUCED (imported, so it stays what CI runs).

`report` reads the runs device_check.sh wrote (one tab-separated line per run: preset, run name, device,
project dir, exit status, wall seconds, log file), writes the JSON report and prints a summary. Exit 0
when every run succeeded, the two runs on the device under test have identical dvc.lock outs and the
decision is the same on every run; 1 otherwise.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))  # tests/projects.py, tests/test_smollm2.py (PYTHONSAFEPATH keeps them off it)

PRESETS = ("toy", "toy-small", "smollm2-reduced")
LOG_TAIL = 3000


def overrides(preset: str) -> dict:
    if preset == "toy":
        return {}
    if preset == "toy-small":
        from projects import SMALL

        return SMALL
    if preset == "smollm2-reduced":
        from projects import merge
        from test_smollm2 import PRESET, REDUCED

        return merge(yaml.safe_load(PRESET.read_text(encoding="utf-8")), REDUCED)
    raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def make(dest: Path, preset: str) -> None:
    from projects import make_project

    over = overrides(preset)
    if preset == "toy":
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "params.yaml"], cwd=REPO)
        if diff.returncode != 0:
            print("warning: params.yaml differs from the committed one; the toy preset uses it as it is",
                  file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    make_project(dest, over)


# --------------------------------------------------------------------------- report


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def decision_of(root: Path) -> dict:
    """decision.json's active_path and decision_state, and each gates/*.json status (None: missing)."""
    d = _json(root / "decision.json") or {}
    gates = {p.stem: (_json(p) or {}).get("status") for p in sorted((root / "gates").glob("*.json"))}
    return {"active_path": d.get("active_path"), "decision_state": d.get("decision_state"), "gates": gates}


def stage_devices(root: Path) -> dict[str, str]:
    """{stage: device} of the last entry of each stage in logs/runs.jsonl: where it really computed."""
    out: dict[str, str] = {}
    try:
        lines = (root / "logs" / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and "stage" in e:
            out[str(e["stage"])] = str(e.get("device"))
    return out


def lock_outs(root: Path) -> dict[str, str] | None:
    from projects import lock_out_hashes

    return lock_out_hashes(root) if (root / "dvc.lock").is_file() else None


def _flat(decision: dict) -> dict[str, object]:
    flat = {k: v for k, v in decision.items() if k != "gates"}
    flat.update({f"gates/{k}.json status": v for k, v in decision["gates"].items()})
    return flat


def compare_decisions(decisions: dict[str, dict]) -> list[dict]:
    """The keys whose value is not the same in every run, with each run's value."""
    flats = {run: _flat(d) for run, d in decisions.items()}
    keys = sorted(set().union(*flats.values()))
    return [{"key": k, **{run: f.get(k) for run, f in flats.items()}}
            for k in keys if len({json.dumps(f.get(k)) for f in flats.values()}) > 1]


def _machine() -> dict:
    info: dict = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # the report still comes out
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _tail(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


def report(runs_tsv: Path, out: Path) -> int:
    presets: dict[str, dict] = {}
    for line in runs_tsv.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        preset, run, device, root, rc, wall, log = line.split("\t")
        presets.setdefault(preset, {})[run] = {"device": device, "dir": root, "rc": int(rc),
                                               "wall_s": round(float(wall), 1), "log": log}
    result: dict = {"schema": "sasgate-device-check/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": _machine(), "presets": {}}
    ok_all = True
    lines: list[str] = []
    for preset, runs in presets.items():
        entry: dict = {"runs": {}}
        for run, r in runs.items():
            root = Path(r["dir"])
            devices = stage_devices(root)
            entry["runs"][run] = {"device": r["device"], "rc": r["rc"], "wall_s": r["wall_s"],
                                  "stage_devices": sorted(set(devices.values())),
                                  "decision": decision_of(root) if r["rc"] == 0 else None}
            if r["rc"] != 0:
                entry["runs"][run]["log_tail"] = _tail(Path(r["log"]))
            elif set(devices.values()) - {r["device"]}:
                entry["runs"][run]["device_mismatch"] = devices  # a stage computed elsewhere than asked
        succeeded = all(r["rc"] == 0 for r in runs.values())
        ran_where_asked = all("device_mismatch" not in e for e in entry["runs"].values())
        # the two runs on the device under test (named <device>_a, <device>_b by device_check.sh)
        pair = sorted(run for run in runs if run.endswith(("_a", "_b")))
        det: dict = {"runs": pair}
        if len(pair) == 2 and all(runs[p]["rc"] == 0 for p in pair):
            a, b = (lock_outs(Path(runs[p]["dir"])) for p in pair)
            if a is None or b is None:
                det.update(identical=False, error="a run left no dvc.lock")
            else:
                differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
                only = sorted(set(a) ^ set(b))
                det.update(identical=not differ and not only, n_outs=len(set(a) | set(b)), differ=differ,
                           only_in_one=only)
        else:
            det.update(identical=None, error="a run failed or is missing: nothing to compare")
        decided = {run: e["decision"] for run, e in entry["runs"].items() if e["decision"] is not None}
        diffs = compare_decisions(decided) if len(decided) == len(runs) and decided else None
        entry["determinism"] = det
        entry["decision"] = {"same": None if diffs is None else not diffs, "differences": diffs,
                             "value": next(iter(decided.values())) if diffs == [] else None}
        entry["ok"] = bool(succeeded and ran_where_asked and det.get("identical") and diffs == [])
        ok_all &= entry["ok"]
        result["presets"][preset] = entry

        lines.append(f"{preset}:")
        for run, e in entry["runs"].items():
            status = "ok" if e["rc"] == 0 else f"FAILED (exit {e['rc']})"
            where = ",".join(e["stage_devices"]) or "?"
            lines.append(f"  {run:<8} {e['wall_s']:>8.1f} s  {status}  stages ran on: {where}"
                         + ("  (NOT where asked)" if "device_mismatch" in e else ""))
        if det.get("identical") is None:
            lines.append(f"  dvc.lock outs, {' vs '.join(pair)}: not compared ({det['error']})")
        elif det.get("identical"):
            lines.append(f"  dvc.lock outs, {' vs '.join(pair)}: all {det['n_outs']} identical")
        else:
            lines.append(f"  dvc.lock outs, {' vs '.join(pair)}: DIFFER: "
                         + ", ".join(det.get("differ", []) + [f"{k} (in one run only)" for k in det.get("only_in_one", [])])
                         + (f" ({det['error']})" if "error" in det else ""))
        if diffs is None:
            lines.append("  decision: not compared (a run failed)")
        elif not diffs:
            v = entry["decision"]["value"]
            gates = ", ".join(f"{k}={s}" for k, s in v["gates"].items())
            lines.append(f"  decision: same on every run: {v['active_path']} / {v['decision_state']}; {gates}")
        else:
            lines.append("  decision: DIFFERS: " + "; ".join(
                f"{d['key']}: " + ", ".join(f"{run}={d[run]}" for run in decided) for d in diffs))
    result["ok"] = ok_all
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"device check: {'OK' if ok_all else 'NOT OK'}; report {out}")
    return 0 if ok_all else 1


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "make":
        make(Path(argv[1]), argv[2])
        return 0
    if len(argv) == 3 and argv[0] == "report":
        return report(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
