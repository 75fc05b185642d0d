"""Evaluate a generated folder against a real one: FID, KID, precision / recall overall and per
scenario, and condition accuracy (does the image show the scenario that was asked for?).

Features come from a pluggable extractor: any object with `name`, `image_size` and
`__call__(uint8 (N, S, S, 3)) -> (N, D)`; by default the FID Inception-v3 when its weights are
given, else the scenario classifier's embedding. The classifier is loaded from a folder or trained here on the
labelled real frames; its held-out accuracy is part of the result, so a reader can tell whether its
verdict on generated frames deserves trust.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.eval import metrics
from drivedit.eval.classifier import ScenarioClassifier, train_scenario_classifier
from drivedit.eval.folders import ImageFolder, index_folder, vocabulary_for
from drivedit.eval.inception import InceptionFeatures
from drivedit.eval.scene_check import LayoutFeatures, scene_likeness_of_features


def _features(folder: ImageFolder, extractor, size: int, batch_size: int, progress: bool = False,
              desc: str = "features") -> np.ndarray:
    """(N, D) features of the folder's images, `batch_size` at a time; a progress bar on stderr if asked."""
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(folder), desc=desc, unit="img", disable=not progress, leave=True) as bar:
        for images in folder.batches(size, batch_size):
            chunks.append(extractor(images))
            bar.update(len(images))
    return np.concatenate(chunks)


def distribution_metrics(real: np.ndarray, fake: np.ndarray, k: int = 3, kid_subsets: int = 100,
                         kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID, KID (mean, std), precision and recall of two feature sets. A metric that needs more samples
    than there are is None, with the reason under `notes`."""
    out: dict = {"num_real": int(len(real)), "num_fake": int(len(fake)), "fid": None, "kid": None,
                 "kid_std": None, "precision": None, "recall": None, "notes": []}
    n = min(len(real), len(fake))
    if n >= 2:
        out["fid"] = metrics.fid(real, fake)
        out["kid"], out["kid_std"] = metrics.kid(real, fake, kid_subsets, kid_subset_size, seed)
    else:
        out["notes"].append("FID and KID need at least 2 real and 2 generated images")
    if n > k:
        out["precision"], out["recall"] = metrics.precision_recall(real, fake, k)
    else:
        out["notes"].append(f"precision and recall need more than k={k} images on each side")
    return out


TRAINED_HERE = "trained on the real folder"


def _train_on_real(real: ImageFolder, image_size: int, steps: int, seed: int, device: str,
                   log: Callable[[str], None]) -> ScenarioClassifier:
    if not real.labelled:
        raise ValueError(f"cannot train the scenario classifier: {real.root} has no labels.json; "
                         "give a labelled real folder, a trained --classifier, or --inception-weights")
    log(f"training the scenario classifier on {len(real)} real frames ({image_size} px, {steps} steps)")
    clf, acc = train_scenario_classifier(real.load(image_size), real.scenarios, real.vocabulary,
                                         image_size=image_size, steps=steps, seed=seed, device=device, log=log)
    log(f"scenario classifier held-out accuracy {acc:.3f} on {clf.num_heldout} real frames")
    return clf


def _predict(clf: ScenarioClassifier, folder: ImageFolder, batch_size: int) -> np.ndarray:
    return np.concatenate([clf.predict(b) for b in folder.batches(clf.image_size, batch_size)])


def evaluate_folders(
    real: str | Path,
    fake: str | Path,
    *,
    classifier: str | Path | ScenarioClassifier | None = None,
    train_classifier: bool | None = None,
    save_classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
    extractor=None,
    image_size: int = 32,
    scenarios: list[str] | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    classifier_steps: int = 300,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 256,
    log: Callable[[str], None] = print,
    progress: bool = False,
    scene_check: bool = True,
) -> dict:
    """Compare a generated folder with a real one. Returns a JSON-ready dict:

    - `features` (extractor name, dim and input size),
    - `real` / `fake` (folder, counts per scenario, frames dropped by the scenario rules, label names
      without an image file),
    - `classifier` (source, held-out accuracy and per-scenario held-out accuracy; None if none is used),
    - `overall` and `per_scenario[name]`: num_real, num_fake, fid, kid, kid_std, precision, recall,
      condition_accuracy (None where it cannot be computed, with `notes`),
    - `confusion`: rows = requested scenario, columns = the classifier's verdict, on generated images,
    - `scene` (with `scene_check`): the classifier-free scene check (eval/scene_check.py) overall; each
      `per_scenario` entry then also has `layout_agreement` and `layout_fd`.

    `train_classifier=None` means: train one on the real frames when no classifier is given and the
    real folder is labelled. `progress` shows a progress bar on stderr while features are extracted.
    """
    if classifier is not None and train_classifier:
        raise ValueError("give either a trained classifier or train_classifier=True, not both")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clf, clf_source = None, None
    if isinstance(classifier, ScenarioClassifier):
        clf, clf_source = classifier, "given"
    elif classifier is not None:
        clf, clf_source = ScenarioClassifier.load(classifier, device=device), str(classifier)
    # a classifier fixes the vocabulary: its output ids are only meaningful in its own
    names = clf.vocabulary if clf is not None else list(scenarios or DEFAULT_SCENARIOS)
    if scenarios is not None and list(scenarios) != list(names):
        raise ValueError(f"scenarios {list(scenarios)} differ from the classifier's vocabulary {names}; "
                         "drop --scenarios or use a classifier trained on this vocabulary")
    vocab = vocabulary_for(names)
    real_f, fake_f = index_folder(str(real), vocab), index_folder(str(fake), vocab)
    if train_classifier is None:
        train_classifier = clf is None and real_f.labelled
    if clf is None and train_classifier:
        clf, clf_source = _train_on_real(real_f, image_size, classifier_steps, seed, device, log), TRAINED_HERE
        if save_classifier is not None:
            clf.save(save_classifier)
            log(f"scenario classifier saved to {save_classifier}")

    if extractor is None and inception_weights is not None:
        extractor = InceptionFeatures(inception_weights, device=device)
    elif extractor is None and clf is not None:
        extractor = clf
    elif extractor is None:
        raise ValueError("no feature extractor: give --inception-weights PATH (pytorch-fid format), a trained "
                         "--classifier PATH, or a labelled real folder to train a classifier on")
    size = extractor.image_size
    log(f"extracting {extractor.name} features of {len(real_f)} real and {len(fake_f)} generated images")
    real_x = _features(real_f, extractor, size, batch_size, progress, "real features")
    fake_x = _features(fake_f, extractor, size, batch_size, progress, "generated features")

    predictions = _predict(clf, fake_f, batch_size) if clf is not None and fake_f.labelled else None

    result = {
        "features": {"extractor": extractor.name, "dim": int(real_x.shape[1]), "image_size": size},
        "vocabulary": list(names),
        "real": _describe(real_f),
        "fake": _describe(fake_f),
        "classifier": None if clf is None else {
            "source": clf_source, "image_size": clf.image_size, "heldout_accuracy": clf.heldout_accuracy,
            "num_heldout": clf.num_heldout, "heldout_per_scenario": clf.heldout_per_scenario,
            "chance": 1.0 / len(clf.vocabulary)},
        "overall": distribution_metrics(real_x, fake_x, k, kid_subsets, kid_subset_size, seed),
        "per_scenario": {},
        "confusion": None,
    }
    if clf is not None and clf_source != TRAINED_HERE and real_f.labelled:
        # a classifier trained elsewhere: how well it reads *these* real frames is the trust signal
        real_pred = _predict(clf, real_f, batch_size)
        result["classifier"]["accuracy_on_real"] = float((real_pred == real_f.scenarios).mean())
    result["overall"]["condition_accuracy"] = (
        None if predictions is None else float((predictions == fake_f.scenarios).mean()))
    if predictions is not None:
        confusion = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(confusion, (fake_f.scenarios, predictions), 1)
        result["confusion"] = confusion.tolist()

    scene_real = scene_fake = None
    if scene_check:
        layout = LayoutFeatures()
        scene_real = _features(real_f, layout, layout.image_size, batch_size, progress, "real layout")
        scene_fake = _features(fake_f, layout, layout.image_size, batch_size, progress, "generated layout")
        result["scene"] = scene_likeness_of_features(scene_real, scene_fake)
    if real_f.labelled and fake_f.labelled:
        for sid, name in enumerate(names):
            r, f = real_f.scenarios == sid, fake_f.scenarios == sid
            if not r.any() and not f.any():
                continue
            entry = distribution_metrics(real_x[r], fake_x[f], k, kid_subsets, kid_subset_size, seed)
            entry["condition_accuracy"] = (
                None if predictions is None or not f.any() else float((predictions[f] == sid).mean()))
            if scene_real is not None and r.sum() >= 2 and f.sum() >= 2:
                scene = scene_likeness_of_features(scene_real[r], scene_fake[f])
                entry["layout_agreement"], entry["layout_fd"] = scene["layout_agreement"], scene["layout_fd"]
            result["per_scenario"][name] = entry
    return result


def _describe(folder: ImageFolder) -> dict:
    return {"dir": folder.root, "num_images": len(folder), "labelled": folder.labelled,
            "per_scenario": folder.counts(), "dropped": folder.dropped,
            "missing": len(folder.missing), "missing_examples": folder.missing[:5]}
