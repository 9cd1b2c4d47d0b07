"""DVC stage `download`: the configured source -> data/raw/<class>/, report and plots."""
from imgclf import console
from imgclf.data.ingest import ingest
from imgclf.data.sources import check_source, iter_source, temporary_workdir
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.serve import figures
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    check_source(params.data, layout.root)
    with tracking.stage_run("download", params, layout.root) as run, \
            temporary_workdir(layout.raw.parent) as workdir:
        report = ingest(iter_source(params.data, layout.root, layout.root / workdir), layout.raw,
                        max_per_class=params.data.max_per_class, seed=params.seed,
                        near_duplicate_bits=params.data.near_duplicate_bits)
        write_json(layout.reports("download") / "report.json", report.as_dict())
        write_json(layout.summary("download"), report.summary())
        plots = layout.plots("download")
        figures.class_distribution(report.counts, plots / "class_distribution.png")
        samples = []
        for label in sorted(report.counts):
            files = sorted((layout.raw / label).iterdir())[:6]
            samples.extend((f, label) for f in files)
        figures.image_grid(samples, plots / "samples.png", columns=6, title="Samples per class")
        run.log_metrics({k: v for k, v in report.summary().items() if isinstance(v, (int, float))})
        run.log_artifacts(layout.reports("download"))
        run.log_artifacts(plots)
    details = layout.reports("download") / "report.json"
    if report.skipped:
        console.warn(f"{console.count(len(report.skipped), 'file')} skipped (not a usable image), "
                     f"e.g. {report.skipped[0]['origin']}: {report.skipped[0]['reason']}; all in {details.relative_to(layout.root)}")
    if report.conflicts:
        first = report.conflicts[0]
        console.warn(f"{console.count(len(report.conflicts), 'photo')} filed under two classes excluded, e.g. "
                     f"{' and '.join(first['origins'])} ({', '.join(first['labels'])}); "
                     f"all in {details.relative_to(layout.root)}")
    return download_line(report.summary())


def download_line(summary: dict) -> str:
    """``download: 3,666 images in 5 classes (1 skipped, 3 duplicates removed)``"""
    notes = [f"{summary[key]:,} {words}" for key, words in (
        ("skipped", "skipped"), ("duplicates_removed", "duplicates removed"),
        ("label_conflicts", "under two classes excluded"), ("dropped_by_max_per_class", "over data.max_per_class left out"),
        ("converted_to_png", "converted to PNG")) if summary.get(key)]
    return (f"download: {console.count(summary['images'], 'image')} in {console.count(summary['classes'], 'class', 'classes')}"
            + (f" ({', '.join(notes)})" if notes else ""))


if __name__ == "__main__":
    run_stage(main)
