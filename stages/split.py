"""DVC stage `split`: data/raw -> data/split/{train,val,test}/<class>/, image counts per
split and class in reports/split/summary.json."""
from imgclf import tracking
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.split import assign, list_class_images, read_groups, write_split


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    with tracking.stage_run("split", params, layout.root) as run:
        assignments = assign(list_class_images(layout.raw), params.split, params.seed, read_groups(layout.raw))
        counts = write_split(assignments, layout.split)
        write_json(layout.summary("split"), counts)
        run.log_metrics({f"{split}_images": c["total"] for split, c in counts.items()})
    print("split: " + ", ".join(f"{s}={c['total']}" for s, c in counts.items()))


if __name__ == "__main__":
    run_stage(main)
