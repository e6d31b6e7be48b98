"""Session-10 probe (not a CLI command): how much of Algorithm 1's attack survives bf16 autocast.

PYTHONPATH=$PWD python docs/results/session10/attack_bf16_probe.py BASE.pt [PER_CLASS] [CACHE]
BASE.pt: a synthetic-pills baseline saved by generator_probe.py (--per-class PER_CLASS, default 600). CPU bf16
autocast stands in for the GPU's (the engine picks bf16 on an H100). 256 training photos of the critical pairs'
source classes are attacked towards their critical targets, in fp32 and under autocast.
"""
import sys
import torch, json
from dataclasses import replace
from pathlib import Path
from models.attacks import targeted_attack, OUTCOME_NAMES
from models.experiment_setups import SYNTH_EXPERIMENT_CONFIG, load_splits, recipe_for
from models.networks import create_model
from models.pmi import PMI_EXPERT_COSTS
torch.set_num_threads(1)
r0 = recipe_for("synthetic-pills")
recipe = replace(r0, synth_per_class=int(sys.argv[2]) if len(sys.argv) > 2 else 600)
splits = load_splits(recipe, seed=0, data_dir=None, cache_dir=Path(sys.argv[3] if len(sys.argv) > 3 else ".gpu/cache"))
model = create_model(recipe.arch, splits.num_classes, in_channels=splits.in_channels)
model.load_state_dict(torch.load(sys.argv[1])); model.eval()
classes = list(splits.classes)
xs, ys, ts = [], [], []
ds = splits.train
for i in range(len(ds)):
    x, y = ds[i]
    for (a, b) in PMI_EXPERT_COSTS:
        if classes[y] == a:
            xs.append(x); ys.append(y); ts.append(classes.index(b))
    if len(xs) >= 256: break
x, y, t = torch.stack(xs), torch.tensor(ys), torch.tensor(ts)
opts = dict(eps=0.3, steps=10, step_size=0.075, norm="linf", sign=True)
for name, kw in [("recipe sign 0.075", opts), ("paper raw grad eta 1e-4 eps 1", dict(eps=1.0, steps=50, step_size=1e-4, norm="linf", sign=False))]:
    out = {}
    for prec in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(prec == "bf16")):
            r = targeted_attack(model, x, y, t, **kw)
        d = r.delta
        same = ((x + d).to(torch.bfloat16) == x.to(torch.bfloat16)).float().mean().item()
        with torch.no_grad():
            p0 = torch.log_softmax(model(x), 1).gather(1, t[:, None]).mean().item()
            p1 = torch.log_softmax(model(x + d), 1).gather(1, t[:, None]).mean().item()
        out[prec] = {"outcomes": {OUTCOME_NAMES[k]: int((r.outcome == k).sum()) for k in OUTCOME_NAMES},
                     "mean|delta|": round(d.abs().mean().item(), 5), "bf16-identical inputs": round(same, 4),
                     "fp32 mean log p_target clean/adv": [round(p0, 3), round(p1, 3)]}
    print(name, json.dumps(out, indent=1))
