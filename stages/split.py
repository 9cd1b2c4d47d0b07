"""DVC stage `split`: data/raw, with the reviewed label corrections applied, ->
data/split/{train,val,test}/<class>/, image counts per split and class in reports/split/summary.json."""
from imgclf.data.corrections import apply_corrections, read_corrections
from imgclf.data.split import assign, list_class_images, read_groups, write_split
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    corrections_file = layout.root / params.split.corrections  # an absolute path stays as it is
    corrections = read_corrections(corrections_file)
    classes, corrected = apply_corrections(list_class_images(layout.raw), corrections, layout.raw,
                                           corrections_file, subset=params.data.max_per_class > 0,
                                           data_name=params.data.set_name)
    with tracking.stage_run("split", params, layout.root) as run:
        assignments = assign(classes, params.split, params.seed, read_groups(layout.raw))
        counts = write_split(assignments, layout.split)
        write_json(layout.summary("split"), {**counts, "corrections": corrected})
        run.log_metrics({**{f"{split}_images": c["total"] for split, c in counts.items()}, **corrected})
    note = ""
    if len(corrections) > corrected["other_data"]:
        note = f" (corrections: {corrected['excluded']} excluded, {corrected['relabelled']} relabelled"
        note += f", {corrected['skipped']} skipped: not in this capped subset)" if corrected["skipped"] else ")"
    if corrected["other_data"]:
        others = sorted({item.data for item in corrections if item.data and item.data != params.data.set_name})
        note += (f" ({corrected['other_data']} rows of {corrections_file.name} made for {', '.join(others)} set aside: "
                 f"this data is {params.data.set_name})")
    return "split: " + ", ".join(f"{s} {c['total']:,}" for s, c in counts.items()) + " images" + note


if __name__ == "__main__":
    run_stage(main)
