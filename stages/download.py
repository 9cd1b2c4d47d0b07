"""DVC stage `download`: the configured source -> data/raw/<class>/, report and plots."""
from imgclf import figures, tracking
from imgclf.ingest import ingest
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.sources import check_source, iter_source, temporary_workdir


def main() -> None:
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
    print(f"download: {report.summary()}")
    for skipped in report.skipped:
        print(f"  skipped {skipped['origin']}: {skipped['reason']}")
    for conflict in report.conflicts:
        print(f"  label conflict ({conflict['kind']}), excluded: {conflict['origins']} "
              f"({', '.join(conflict['labels'])})")


if __name__ == "__main__":
    run_stage(main)
