"""DVC stage `activations`: the frozen bottom of the backbone, once over the train and val
images of data/store/transfer -> data/activations/ (shared by the head and finetune stages), and
the pooled features of every split -> data/activations/features/ (the head's inputs, the audit's)."""
from imgclf import cluster
from imgclf.data.store import open_split
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.track import tracking
from imgclf.train import training
from imgclf.train.activations import write_activations


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    cluster.require_single_machine("activations")
    training.configure(params.seed, params.train)
    with tracking.stage_run("activations", params, layout.root) as run:
        size = params.model.image_size
        train, val, test = (open_split(layout.store("transfer"), split, size) for split in ("train", "val", "test"))
        info = write_activations(params.model, params.finetune, train, val, test, layout.activations)
        write_json(layout.summary("activations"), info)
        runtime = info["runtime"]
        run.log_metrics({"train_images": len(train), "val_images": len(val), "cut": info["cut"],
                         "images_per_s": info["images_per_s"], "on_litert": int(runtime["runtime"] == "litert")})
        run.log_artifacts(layout.summary("activations"), "reports")
    parity = f", within {runtime['parity']['max_abs_diff']:.1e} of Keras" if "parity" in runtime else ""
    return (f"activations: {len(train) + len(val):,} images (train {len(train):,}, val {len(val):,}) through "
            f"{info['backbone']} up to {info['cut_layer']}, {info['images_per_s']:.0f} images/s on "
            f"{'LiteRT' if runtime['runtime'] == 'litert' else 'Keras'}{parity}; pooled features of every split "
            f"in {info['feature_seconds']:.0f} s")


if __name__ == "__main__":
    run_stage(main)
