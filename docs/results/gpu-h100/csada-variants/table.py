"""Prints table.md: each variant's summed critical-pair errors, mean accuracy and mean cost against its seeds' baselines."""
import ast
import collections
import glob
import json
import pathlib

HERE = pathlib.Path(__file__).parent
rows: dict[str, dict[int, dict]] = collections.defaultdict(dict)  # variant -> seed -> row
for run in ("run-b", "run-c"):
    for path in sorted(glob.glob(f"{HERE}/{run}/s*.json")):
        data = json.loads(pathlib.Path(path).read_text())
        for name, row in data["rows"].items():
            rows[name][data["seed"]] = row
# run-a's JSON files did not come back from the device (only 8 seeds' logs did); its baselines were the same
# (its recipe3e7 rows equal run-b's on every seed it has), so its variants are read against run-b's BASE rows.
for path in sorted(glob.glob(f"{HERE}/run-a/log*.txt")):
    for line in pathlib.Path(path).read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1] != "recipe3e7":
            rows[parts[1]][int(parts[0])] = ast.literal_eval(parts[2])


def agg(name: str, split: str, seeds: list[int]) -> tuple[int, float, float]:
    picked = [rows[name][s][split] for s in seeds]
    return (sum(r["crit"] for r in picked), sum(r["acc"] for r in picked) / len(picked),
            sum(r["cost"] for r in picked) / len(picked))


print("| variant | seeds | valid: critical errors (x base) / accuracy (vs base) "
      "| test: critical errors (x base) / accuracy (vs base) | test mean cost (x base) |")
print("| --- | --- | --- | --- | --- |")
for name in rows:
    seeds = sorted(rows[name])
    bv, bt = agg("BASE", "valid", seeds), agg("BASE", "test", seeds)
    vv, vt = agg(name, "valid", seeds), agg(name, "test", seeds)
    print(f"| {name} | {len(seeds)} | {vv[0]} ({vv[0] / bv[0]:.2f}) / {vv[1]:.2f} ({vv[1] - bv[1]:+.2f}) "
          f"| {vt[0]} ({vt[0] / bt[0]:.2f}) / {vt[1]:.2f} ({vt[1] - bt[1]:+.2f}) | {vt[2]:.1f} ({vt[2] / bt[2]:.3f}) |")
