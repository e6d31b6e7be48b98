"""Throwaway GPU probe: served probabilities in fp32 (CPU, GPU) vs bf16 autocast (GPU) on a trained model."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from models.experiment_setups import recipe_for, load_splits, default_cost_matrix
from models.experiments import _train_baseline
from models.evaluate import expected_costs
from models.runtime import prepare_for_inference, channels_last_input, autocast_context
from models.networks import create_model

out = {}
recipe = recipe_for("synthetic-pills")
t = time.time()
splits = load_splits(recipe, seed=0, data_dir=None, cache_dir=Path(sys.argv[1]))
out["data_s"] = time.time() - t
cuda = torch.device("cuda")
model, info = _train_baseline(recipe, splits, seed=0, device=cuda, pretrained=None)
out["baseline"] = info
costs = default_cost_matrix("synthetic-pills", tuple(splits.classes), cost_seed=0)
xs = torch.stack([splits.test[i][0] for i in range(len(splits.test))] + [splits.valid[i][0] for i in range(len(splits.valid))])
def probs(device, amp):
    m = create_model(recipe.arch, splits.num_classes).to(device)
    m.load_state_dict(model.state_dict()); m.eval()
    served = prepare_for_inference(m, xs[:2].to(device))
    chunks = []
    with torch.inference_mode(), autocast_context(device, enabled=amp):
        for i in range(0, len(xs), 64):
            chunks.append(served(channels_last_input(xs[i:i+64]).to(device)).float().cpu())
    return torch.softmax(torch.cat(chunks), 1).double().numpy()
ref = probs(torch.device("cpu"), False)
for name, (dev, amp) in {"cuda_fp32": (cuda, False), "cuda_bf16": (cuda, True)}.items():
    p = probs(dev, amp)
    d = np.abs(p - ref)
    out[name] = {"n": len(p), "max_abs_dprob": float(d.max()), "mean_abs_dprob": float(d.mean()),
                 "p99_abs_dprob_top": float(np.quantile(np.abs(p.max(1) - ref[np.arange(len(p)), p.argmax(1)]), 0.99)),
                 "argmax_changed": int((p.argmax(1) != ref.argmax(1)).sum()),
                 "bayes_changed": int((expected_costs(p, costs).argmin(1) != expected_costs(ref, costs).argmin(1)).sum())}
# forward speed, resnet34 @224, batch 16, served form
for arch, size in (("resnet34", 224), ("small_cnn", 48)):
    m = prepare_for_inference(create_model(arch, 20).to(cuda).eval(), torch.zeros(2, 3, size, size, device=cuda))
    x = channels_last_input(torch.randn(16, 3, size, size, device=cuda))
    for amp in (False, True):
        with torch.inference_mode(), autocast_context(cuda, enabled=amp):
            for _ in range(10): m(x)
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(50): m(x)
            torch.cuda.synchronize()
        out[f"{arch}_b16_forward_ms_{'bf16' if amp else 'fp32'}"] = (time.perf_counter() - t) / 50 * 1000
print(json.dumps(out, indent=1))
