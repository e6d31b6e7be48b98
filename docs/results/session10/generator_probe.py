"""Session-10 probe (not a CLI command): synthetic-pills generator variants, seed 0, VALIDATION figures only (test is not read).

PYTHONPATH=$PWD python docs/results/session10/generator_probe.py --render 128 --size 64 --out OUT.json [--cache DIR]
Trains the recipe's baseline on the variant (saved as OUT.json.base.pt), then the given CSADA points; prints and
writes accuracy, total cost, critical-pair errors (PMI_EXPERT_COSTS order) and the 8 most frequent confusions.
"""
from __future__ import annotations
import argparse, json, time
from dataclasses import replace, asdict
from pathlib import Path
import numpy as np
import torch
from models.evaluate import confusion_matrix, predictions_from_outputs
from models.experiment_setups import SYNTH_EXPERIMENT_CONFIG, default_cost_matrix, load_splits, recipe_for
from models.experiments import _Evaluator, _finetune, _report, _train_baseline
from models.pmi import PMI_EXPERT_COSTS
from models.runtime import select_device, set_cpu_threads

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--synth", default="{}", help="JSON overrides of SYNTH_EXPERIMENT_CONFIG")
p.add_argument("--render", type=int, default=96)
p.add_argument("--size", type=int, default=48)
p.add_argument("--per-class", type=int, default=250)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--csada", default="0,1", help="indices into the recipe's csada grid to run")
p.add_argument("--extra", default="[]", help="JSON list of {options, train} CSADA points (options merged over the recipe's)")
p.add_argument("--out", type=Path, required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--cache", type=Path, default=Path(".gpu/cache"))
a = p.parse_args()
set_cpu_threads(a.threads)
dev = select_device("cpu")
ov = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(a.synth).items()}
cfg = replace(SYNTH_EXPERIMENT_CONFIG, **ov)
r0 = recipe_for("synthetic-pills")
recipe = replace(r0, synth_config=cfg, synth_image_size=a.render, image_size=a.size, synth_per_class=a.per_class,
                 baseline=replace(r0.baseline, epochs=a.epochs))
t = time.monotonic()
splits = load_splits(recipe, seed=a.seed, data_dir=None, cache_dir=a.cache)
res = {"args": vars(a) | {"out": str(a.out)}, "render_s": round(time.monotonic() - t, 1), "rows": {}}
classes = list(splits.classes)
cm = default_cost_matrix("synthetic-pills", tuple(classes), cost_seed=0)
crit = [(classes.index(t_), classes.index(z)) for t_, z in PMI_EXPERT_COSTS]
ev = _Evaluator(splits, device=dev, batch_size=512)

def summ(model, kind="logits"):
    out, lab = ev.outputs(model, "valid")
    pred = predictions_from_outputs(out, kind)
    r = _report(pred, lab, cm)
    conf = confusion_matrix(lab, pred, len(classes))
    off = conf.copy(); np.fill_diagonal(off, 0)
    top = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:8], off.shape))[0]
    return {"acc": round(100 * r["accuracy"], 2), "cost": r["total_cost"], "n": int(conf.sum()),
            "crit": int(sum(conf[i, j] for i, j in crit)), "per_pair": [int(conf[i, j]) for i, j in crit],
            "top": [f"{classes[i][-4:]}->{classes[j][-4:]}:{int(off[i, j])}" for i, j in top]}

t = time.monotonic()
base, info = _train_baseline(recipe, splits, seed=a.seed, device=dev, pretrained=None)
res["base_s"] = round(time.monotonic() - t, 1); res["base_info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
res["rows"]["BASE"] = summ(base)
print(json.dumps(res), flush=True)
a.out.write_text(json.dumps(res, indent=1))
torch.save(base.state_dict(), str(a.out) + ".base.pt")
from models.experiment_setups import GridPoint
points = [(f"csada{i}", recipe.grid("csada")[int(i)]) for i in a.csada.split(",") if i]
for j, e in enumerate(json.loads(a.extra)):
    points.append((f"extra{j}", GridPoint(options={**recipe.grid("csada")[0].options, **e.get("options", {})}, train=e.get("train", {}))))
for i, point in points:
    t = time.monotonic()
    model, kind, finfo = _finetune("csada", point, base=base, recipe=recipe, splits=splits, cost_matrix=cm, seed=a.seed, device=dev)
    row = summ(model, kind); row["time_s"] = round(time.monotonic() - t, 1); row["lr"] = point.train.get("lr")
    res["rows"][i] = row
    print(json.dumps({i: row, "point": [point.options, point.train]}), flush=True)
    a.out.write_text(json.dumps(res, indent=1))
