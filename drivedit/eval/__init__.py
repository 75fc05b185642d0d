"""Evaluation of generated datasets: FID / KID / precision / recall on pluggable features, per
scenario, and condition accuracy judged by a scenario classifier trained on real frames."""
from drivedit.eval.classifier import ScenarioClassifier, train_scenario_classifier
from drivedit.eval.evaluate import distribution_metrics, evaluate_folders
from drivedit.eval.folders import ImageFolder, index_folder
from drivedit.eval.inception import FIDInception3, InceptionFeatures, load_fid_inception
from drivedit.eval.metrics import fid, kid, precision_recall

__all__ = [
    "FIDInception3", "ImageFolder", "InceptionFeatures", "ScenarioClassifier", "distribution_metrics",
    "evaluate_folders", "fid", "index_folder", "kid", "load_fid_inception", "precision_recall",
    "train_scenario_classifier",
]
