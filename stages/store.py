"""DVC stage `store@<name>`: every image of data/split decoded once at one input size ->
data/store/<name>/ (`baseline`: baseline.image_size, `transfer`: model.image_size)."""
import sys

from imgclf.data.datasets import class_names, list_subset
from imgclf.data.split import SPLITS
from imgclf.data.store import build_image_store
from imgclf.params import ParamsError, load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    name = sys.argv[1] if len(sys.argv) == 2 else ""
    sizes = {"baseline": params.baseline.image_size, "transfer": params.model.image_size}
    if name not in sizes:
        raise ParamsError("store", f"usage: python -m stages.store {{{'|'.join(sizes)}}}, got {sys.argv[1:]}")
    with tracking.stage_run(f"store@{name}", params, layout.root) as run:
        names = class_names(layout.split)
        subsets = {split: list_subset(layout.split, split, names) for split in SPLITS}
        counts = build_image_store(subsets, names, sizes[name], layout.store(name), layout.root)
        run.log_metrics({f"{split}_images": count for split, count in counts.items()})
    return (f"store@{name}: {sum(counts.values()):,} images decoded at {sizes[name]} px ("
            + ", ".join(f"{s} {c:,}" for s, c in counts.items()) + ")")


if __name__ == "__main__":
    run_stage(main)
