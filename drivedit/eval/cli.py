"""`drivedit eval --real DIR --fake DIR`: print FID, KID, precision and recall overall and per
scenario, and condition accuracy when both folders carry labels; log them as MLflow metrics of the
run that made the fake folder (or `--mlflow-run`), see drivedit/eval/mlflow_log.py; and a condition
transfer's label survival when given a detector's predictions on the transferred and the original frames, and
the layout fidelity of frames generated from layouts when given the detect job's scores on them and on real
frames (drivedit/eval/fidelity.py)."""
from __future__ import annotations

import argparse
import json
import sys

from drivedit import storage


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="drivedit eval",
        description="Compare a generated image folder with a real one. Folders hold images (any depth) and "
                    "optionally a BDD100K labels.json; scenarios come from its weather / timeofday.")
    ap.add_argument("--real", required=True, help="folder (or s3:// URI) of real frames")
    ap.add_argument("--fake", required=True, help="folder (or s3:// URI) of generated frames")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--classifier", help="a trained scenario-classifier folder (classifier.safetensors + .json)")
    src.add_argument("--train-classifier", action="store_true",
                     help="train the scenario classifier on the labelled real frames (the default when no "
                          "--classifier is given and the real folder is labelled)")
    ap.add_argument("--save-classifier", help="where to save a classifier trained here, for later runs")
    ap.add_argument("--inception-weights",
                    help="pytorch-fid pt_inception-2015-12-05-*.pth: use FID Inception-v3 features instead of "
                         "the classifier's (the classifier still judges condition accuracy)")
    ap.add_argument("--image-size", type=int, default=32, help="side in px the classifier sees (default 32)")
    ap.add_argument("--scenarios", help="comma-separated scenario vocabulary (default: the BDD100K six)")
    ap.add_argument("--k", type=int, default=3, help="neighbours of the precision / recall manifolds")
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--kid-subset-size", type=int, default=1000)
    ap.add_argument("--classifier-steps", type=int, default=300, help="training steps of a classifier trained here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    sv = ap.add_argument_group("label survival of a condition transfer (--fake is the transferred dataset)")
    sv.add_argument("--transferred-predictions",
                    help="a detector's COCO results JSON on the --fake (transferred) images")
    sv.add_argument("--original-labels", help="labels.json of the transfer's source frames")
    sv.add_argument("--original-predictions", help="the same detector's COCO results JSON on the source images")
    sv.add_argument("--transferred-scores", help="instead: `drivedit detect --eval-only` scores folder (gt.json, "
                                                 "predictions.json) of the transferred dataset")
    sv.add_argument("--original-scores", help="the same detector's scores folder on the source frames")
    lf = ap.add_argument_group("layout fidelity of frames generated from layouts (--fake is that dataset)")
    lf.add_argument("--generated-scores", help="`drivedit detect --eval-only --data.val FAKE` scores folder of a "
                                               "detector trained on real frames only (gt.json, predictions.json)")
    lf.add_argument("--real-scores", help="the same detector's scores folder on held-out real frames")
    ap.add_argument("--ignore-under", type=float, default=None, metavar="PX",
                    help="fidelity and survival: boxes with a side (sqrt of the area, in the scored images' pixels) under PX "
                         "are ignore regions on both sides (default: what --fake's spec.json says the generator marked, "
                         "scaled to the size its scores were scored at; 0 for older datasets)")
    ap.add_argument("--json", dest="json_out", help="also write the full result as JSON to this path or URI")
    mlf = ap.add_mutually_exclusive_group()
    mlf.add_argument("--mlflow-run", metavar="RUN",
                     help="log the metrics into this MLflow run: a run id (with --tracking-uri) or a run directory "
                          "holding mlflow_run.json (default: the run that generated --fake, when it recorded one)")
    mlf.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI of --mlflow-run (default: MLFLOW_TRACKING_URI, or the "
                                           "one recorded in the run directory)")
    ap.add_argument("--step", type=int, default=0, help="MLflow step of the logged metrics (e.g. the training step "
                                                         "of the evaluated model; default 0)")
    return ap


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(result: dict) -> str:
    """The human-readable table: one row overall, one per scenario."""
    feats, clf = result["features"], result["classifier"]
    lines = [f"real: {result['real']['dir']} ({result['real']['num_images']} images)   "
             f"fake: {result['fake']['dir']} ({result['fake']['num_images']} images)",
             f"features: {feats['extractor']} ({feats['dim']}-d at {feats['image_size']} px)"]
    if clf is not None:
        line = (f"scenario classifier ({clf['source']}): held-out accuracy {clf['heldout_accuracy']:.3f} on "
                f"{clf['num_heldout']} real frames (chance {clf['chance']:.3f})")
        if "accuracy_on_real" in clf:
            line += f"; accuracy on these real frames {clf['accuracy_on_real']:.3f}"
        lines.append(line)
    for side in ("real", "fake"):
        info = result[side]
        if info["dropped"] or info["missing"]:
            lines.append(f"{side}: dropped by the scenario rules {info['dropped']}, label names without an image "
                         f"{info['missing']} {info['missing_examples']}")
    header = (f"{'scenario':<16}{'real':>7}{'fake':>7}{'FID':>10}{'KID':>10}{'±':>9}{'prec':>7}{'recall':>8}"
              f"{'cond.acc':>10}")
    lines += ["", header, "-" * len(header)]
    rows = [("overall", result["overall"])] + list(result["per_scenario"].items())
    for name, m in rows:
        lines.append(f"{name:<16}{m['num_real']:>7}{m['num_fake']:>7}{_fmt(m['fid']):>10}"
                     f"{_fmt(m['kid'], '.4f'):>10}{_fmt(m['kid_std'], '.4f'):>9}{_fmt(m['precision']):>7}"
                     f"{_fmt(m['recall']):>8}{_fmt(m['condition_accuracy'], '.3f'):>10}")
    scene = result.get("scene")
    if scene is not None:
        lines += ["", f"scene check (no classifier; eval/scene_check.py): layout agreement "
                      f"{scene['layout_agreement']:.3f} (mean map {scene['mean_map_corr']:.3f}, std map "
                      f"{scene['std_map_corr']:.3f}; real frames of one world agree near 1, shuffled patches "
                      f"near 0), layout FD {scene['layout_fd']:.2f}"]
    notes = sorted({n for _, m in rows for n in m["notes"]})
    lines += [f"note: {n} (shown as -)" for n in notes]
    return "\n".join(lines)


def ignore_under(args) -> float:
    """The side under which boxes are ignore regions on both sides of a fidelity or survival ratio, in the scored
    pixels: --ignore-under, else what the generated dataset (--fake) marked (its spec.json), at the size its scores
    folder was scored at, else 0."""
    from drivedit.eval.fidelity import dataset_ignore_under

    if args.ignore_under is not None:
        return args.ignore_under
    return dataset_ignore_under(args.fake, getattr(args, "generated_scores", None) or getattr(args, "transferred_scores", None))


def format_fidelity(lf: dict) -> str:
    """Layout fidelity overall, per scenario and per object size: AP50 generated / real = fidelity; then over
    every layout box (the generator's ignore marks and the size rule undone)."""
    everything = lf.get("all_boxes")
    rule = (f"; boxes under {lf['ignore_under']:g} px are ignore regions on both sides "
            f"({lf['num_boxes_generated']} generated, {lf['num_boxes_real']} real boxes to find)"
            if lf.get("ignore_under") else "")
    lines = [f"layout fidelity: AP50 {_fmt(lf['ap50_generated'], '.3f')} on {lf['num_generated']} generated frames "
             f"/ {_fmt(lf['ap50_real'], '.3f')} on {lf['num_real']} real frames = {_fmt(lf['fidelity'], '.3f')}{rule}",
             f"{'':<16}{'AP50 gen':>10}{'AP50 real':>11}{'fidelity':>10}"]
    rows = list(lf["per_scenario"].items()) + [(f"size {k}", v) for k, v in lf["per_size"].items()]
    if everything is not None and lf.get("ignore_under"):
        rows += [("all boxes", everything)] + [(f"  all, {k}", v) for k, v in everything["per_size"].items()]
    for name, r in rows:
        lines.append(f"{name:<16}{_fmt(r['ap50_generated'], '.3f'):>10}{_fmt(r['ap50_real'], '.3f'):>11}"
                     f"{_fmt(r['fidelity'], '.3f'):>10}")
    return "\n".join(lines + [f"object sizes: {lf['size_scaling']}"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    survival_args = (args.transferred_predictions, args.original_labels, args.original_predictions)
    if any(survival_args) and not all(survival_args):
        parser.error("label survival needs all of --transferred-predictions, --original-labels and "
                     "--original-predictions")
    score_args = (args.transferred_scores, args.original_scores)
    if any(score_args) and not all(score_args):
        parser.error("label survival from score folders needs both --transferred-scores and --original-scores")
    if all(score_args) and any(survival_args):
        parser.error("give label survival either as predictions (--transferred-predictions, ...) or as score "
                     "folders (--transferred-scores, --original-scores), not both")
    fidelity_args = (args.generated_scores, args.real_scores)
    if any(fidelity_args) and not all(fidelity_args):
        parser.error("layout fidelity needs both --generated-scores and --real-scores")
    from drivedit.eval.evaluate import evaluate_folders  # torch import only once the arguments are good
    from drivedit.eval.mlflow_log import log_result, target_run

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  progress to stderr, the table to stdout
    try:
        run = None if args.no_mlflow else target_run(args.fake, args.mlflow_run, args.tracking_uri)
        result = evaluate_folders(
            args.real, args.fake, classifier=args.classifier,
            train_classifier=True if args.train_classifier else None, save_classifier=args.save_classifier,
            inception_weights=args.inception_weights, image_size=args.image_size, scenarios=scenarios,
            k=args.k, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            classifier_steps=args.classifier_steps, seed=args.seed, device=args.device, log=log, progress=True)
        if all(survival_args):
            from drivedit.eval.survival import label_survival

            result["label_survival"] = label_survival(storage.join(args.fake, "labels.json"),
                                                      args.transferred_predictions, args.original_labels,
                                                      args.original_predictions)
        elif all(score_args):
            from drivedit.eval.survival import label_survival_from_scores

            result["label_survival"] = label_survival_from_scores(*score_args, ignore_under=ignore_under(args))
        if all(fidelity_args):
            from drivedit.eval.fidelity import layout_fidelity

            result["layout_fidelity"] = layout_fidelity(*fidelity_args, ignore_under=ignore_under(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"drivedit eval: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    if "label_survival" in result:
        ls = result["label_survival"]
        print(f"\nlabel survival: AP50 {ls['ap50_transferred']:.3f} on the transferred frames / "
              f"{ls['ap50_original']:.3f} on their originals = {ls['survival']:.3f}")
        if ls.get("ignore_under"):
            print(f"  (boxes under {ls['ignore_under']:g} px are ignore regions on both sides; over every carried box: "
                  f"{ls['ap50_transferred_all_boxes']:.3f} / {ls['ap50_original_all_boxes']:.3f} = "
                  f"{ls['survival_all_boxes']:.3f})")
    if "layout_fidelity" in result:
        print("\n" + format_fidelity(result["layout_fidelity"]))
    if args.json_out:
        storage.write_text_atomic(args.json_out, json.dumps(result, indent=2))
        print(f"\nwrote {args.json_out}")
    if run is not None:
        logged = log_result(run, result, args.step)
        print(f"\nlogged {len(logged)} metrics (eval.*) at step {args.step} to MLflow run {run.run_id} "
              f"({storage.redact(run.tracking_uri)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
