"""Probe (session 13): which photos unlike the training photos get verdicts, with and without the
unfamiliar-photo check (models.ood). Not a CLI command; it runs the shipped code paths:

- `worker.registration.finalise_checkpoint` (what the worker and the first run do after training):
  scores, the verdict policy under the PMI expert costs and RXVERIFY_MAX_ACCEPT_RISK 0.05, and the
  familiarity check fitted on the train split with thresholds from the valid split;
- `app.inference.served.load_served_model` and `forward_outputs` (the served copy: BatchNorm folded,
  channels-last), then `Prediction.decide` with the check off (rate 0) and at rates 0.01 and 0.05.

Usage: PYTHONPATH=$PWD python docs/results/session13/unfamiliar_probe.py CHECKPOINT DATA_ROOT OUT.json

Photo sets (200 each, 64 px high, 4:3, JPEG-free, decoded as PIL images and put through the model's
EvalPreset): the test split (every photo prescribed its true product), and five kinds of unfamiliar
photo, each prescribed the model's top class (the worst case: the pharmacy asks about what the model
already believes): `texture` (smooth colour noise), `digit` (scikit-learn 8x8 digits, enlarged),
`flat_noise` (one colour plus pixel noise), `unknown_product` (the generator's vials holding one of
three products that are not in the catalog: an orange 16 mm capsule, a yellow 12 mm round tablet, a
brown 14 mm oval), `empty_vial` (the generator's vials with no pills).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.inference.served import Prediction, forward_outputs, load_served_model
from models.costs import CostMatrix
from models.data import load_image_folder
from models.pmi import PMI_EXPERT_COSTS, PMI_NDCS, PmiProduct
from models.synth import SynthConfig, render_bottle
from worker.registration import finalise_checkpoint

checkpoint, root, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(2)
RATES = (0.0, 0.01, 0.05)
work = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(tempfile.mkdtemp(prefix="unfamiliar-probe-"))
settings = Settings(data_dir=work, device="cpu", max_accept_risk=0.05)
costs = CostMatrix.from_pairs(PMI_NDCS, PMI_EXPERT_COSTS)
started = time.perf_counter()
_scores, _decision, familiarity_report = finalise_checkpoint(checkpoint, work / "final", data_root=root,
                                                             cost_matrix=costs, settings=settings, seed=0)
finalise_s = time.perf_counter() - started
served = load_served_model(work / "final", version="probe", device=torch.device("cpu"))
matrix = costs.reindexed(served.classes)
rng = np.random.default_rng(13)
H, W = 64, 85


def texture() -> Image.Image:
    field = rng.normal(size=(8, 8, 3))
    return Image.fromarray(np.uint8(np.clip(128 + 50 * field, 0, 255))).resize((W, H), Image.BICUBIC)


def digit() -> Image.Image:
    from sklearn.datasets import load_digits
    image = load_digits().images[rng.integers(1797)]
    return Image.fromarray(np.uint8(255 - image / 16 * 255)).resize((W, H), Image.NEAREST).convert("RGB")


def flat_noise() -> Image.Image:
    pixels = rng.uniform(40, 220, size=3)[None, None, :] + rng.normal(scale=12, size=(H, W, 3))
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


UNKNOWN = (PmiProduct("99999-0001", "capsule", "Capsule", "Orange", ("XY",), 16.0, 1, 1, 1),
           PmiProduct("99999-0002", "yellow round", "Round", "Yellow", ("Q7",), 12.0, 1, 1, 1),
           PmiProduct("99999-0003", "brown oval", "Oval", "Brown", ("B2",), 14.0, 1, 1, 1))
EMPTY = SynthConfig(min_pills=0, max_pills=0, pill_coverage=(0.0, 0.0))
SETS = {
    "texture": texture, "digit": digit, "flat_noise": flat_noise,
    "unknown_product": lambda: render_bottle(UNKNOWN[rng.integers(3)], rng=rng, image_size=H),
    "empty_vial": lambda: render_bottle(UNKNOWN[0], rng=rng, image_size=H, config=EMPTY),
}


def verdicts(images: list[Image.Image], prescribed: list[int] | None) -> dict[str, object]:
    tensors = [served.preset(image) for image in images]
    probs, scores = [], []
    for first in range(0, len(tensors), 16):  # the service's batch size
        p, s = forward_outputs(served, tensors[first:first + 16])
        probs.append(p)
        scores.append(s)
    probs_all, scores_all = np.concatenate(probs), np.concatenate(scores)
    result: dict[str, object] = {"n": len(images)}
    for rate in RATES:
        counts = {"match": 0, "mismatch": 0, "review": 0, "photo-unfamiliar": 0}
        for i in range(len(images)):
            r = int(probs_all[i].argmax()) if prescribed is None else prescribed[i]
            prediction = Prediction(probs=probs_all[i], model_version="probe", classes=served.classes, served=served,
                                    stage_scores=scores_all[i])
            decision, _fitted = prediction.decide(prescribed=served.classes[r], cost_matrix=matrix,
                                                  critical_cost=settings.critical_cost_threshold,
                                                  max_accept_risk=settings.max_accept_risk, unfamiliar_photo_rate=rate)
            counts[decision.verdict] += 1
            counts["photo-unfamiliar"] += decision.reason == "photo-unfamiliar"
        result[f"rate_{rate}"] = {k: round(v / len(images), 4) for k, v in counts.items()}
    return result


data = load_image_folder(root, image_size=served.preset.image_size, augment=False, classes=served.classes)
test_images = [Image.open(path).convert("RGB") for path, _label in data.test.samples]
report: dict[str, object] = {"checkpoint": str(checkpoint), "finalise_s": round(finalise_s, 2),
                             "familiarity": familiarity_report, "sets": {}}
report["sets"]["test (correct fills)"] = verdicts(test_images, [label for _path, label in data.test.samples])
for name, make in SETS.items():
    report["sets"][name] = verdicts([make() for _ in range(200)], None)
print(json.dumps(report, indent=1))
out.write_text(json.dumps(report, indent=1) + "\n")
