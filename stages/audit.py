"""DVC stage `audit`: every image of every split scored for how likely its label is wrong,
from the frozen backbone's pooled features (written by the activations stage; no TensorFlow
here) -> reports/audit/, plots/audit/suspects.png, metrics/suspects.json.
The audit only reports: fixes go into the corrections file, which the split stage applies."""
import numpy as np

from imgclf.data.split import SPLITS, raw_sources
from imgclf.data.store import open_split, read_info
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_csv, write_json
from imgclf.serve import figures
from imgclf.serve.audit import LABEL_ISSUE_COLUMNS, AuditSet, audit
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    with tracking.stage_run("audit", params, layout.root) as run:
        features = {split: open_split(layout.features, split, params.model.image_size) for split in SPLITS}
        runtimes = read_info(layout.features)["runtime"]
        raw = raw_sources(layout.split, layout.root)
        sets = [AuditSet(split, features[split].read(np.arange(len(features[split]))), features[split].labels,
                         [raw[p] for p in features[split].paths]) for split in SPLITS]
        class_names = features["test"].class_names
        report = audit(sets, class_names, params.audit, params.seed)

        reports, plots = layout.reports("audit"), layout.plots("audit")
        write_csv(reports / "label_issues.csv", report.label_issues, LABEL_ISSUE_COLUMNS)
        write_csv(reports / "outliers.csv", report.outliers, ["path", "split", "label", "score"])
        write_csv(reports / "cross_split_copies.csv", report.copies,
                  ["path_a", "split_a", "path_b", "split_b", "similarity"])
        write_json(layout.summary("audit"), {**report.summary, "runtime": runtimes})
        write_json(reports / "suspects.json", {"classes": class_names, "suspects": report.suspects})
        write_json(layout.root / "metrics" / "suspects.json", {"suspects": report.summary["suspects"]})
        shown = report.label_issues[:params.audit.gallery_size]
        figures.image_grid([(layout.raw / r["path"], f"{r['given']} -> {r['suggested']}\n{r['score']:.2g}")
                            for r in shown], plots / "suspects.png",
                           title=report.summary.get("skipped") or "Most suspicious labels: given -> suggested (score)")
        run.log_metrics({"suspects": report.summary["suspects"],
                         "cross_split_copies": len(report.copies)})
        run.log_artifacts(reports)
        run.log_artifacts(plots)
    if "skipped" in report.summary:
        return f"audit: no label audit: {report.summary['skipped']} (empty report)"
    return (f"audit: {report.summary['suspects']:,} suspect labels of {report.summary['images']:,} images, "
            f"{len(report.copies):,} copies across splits; review them with python -m imgclf.review")


if __name__ == "__main__":
    run_stage(main)
