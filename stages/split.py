"""DVC stage `split`: data/raw, with the reviewed label corrections applied, ->
data/split/{train,val,test}/<class>/, image counts per split and class in reports/split/summary.json."""
from imgclf import tracking
from imgclf.corrections import apply_corrections, read_corrections
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.split import assign, list_class_images, read_groups, write_split


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    corrections_file = layout.root / params.split.corrections  # an absolute path stays as it is
    corrections = read_corrections(corrections_file)
    classes, corrected = apply_corrections(list_class_images(layout.raw), corrections, layout.raw,
                                           corrections_file, subset=params.data.max_per_class > 0)
    with tracking.stage_run("split", params, layout.root) as run:
        assignments = assign(classes, params.split, params.seed, read_groups(layout.raw))
        counts = write_split(assignments, layout.split)
        write_json(layout.summary("split"), {**counts, "corrections": corrected})
        run.log_metrics({**{f"{split}_images": c["total"] for split, c in counts.items()}, **corrected})
    note = ""
    if corrections:
        note = f" (corrections: {corrected['excluded']} excluded, {corrected['relabelled']} relabelled"
        note += f", {corrected['skipped']} skipped: not in this capped subset)" if corrected["skipped"] else ")"
    return "split: " + ", ".join(f"{s} {c['total']:,}" for s, c in counts.items()) + " images" + note


if __name__ == "__main__":
    run_stage(main)
