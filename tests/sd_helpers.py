"""What the Stable Diffusion test modules share: the tiny world's classes and prompts, the CLI arguments
of a fast run, folder variants, and diffusers' own pipeline over a folder. The fixtures `sd_world` and
`sd_denoiser` that build the world are in conftest.py."""
import json
import shutil

CLASSES = ["n01440764", "golden_retriever", "cherry"]      # sorted labels: cherry 0, golden_retriever 1, n01440764 2
PROMPTS = {"cherry": "sweet cherry", "golden_retriever": "golden retriever", "n01440764": "tench"}
FAST = ["--ipc", "2", "--steps", "6", "--t-stop", "3", "--batch-size", "2"]


def sd_args(world, out, *extra):
    """`distill` arguments for a fast run on the tiny SD world."""
    return ["distill", "--data", world["data"], "--model", world["model"], "--out", str(out),
            "--cache-dir", world["cache"], "--class-names", "cherry=sweet cherry", *FAST, *extra]


def sd_variant(sd_world, tmp_path, scheduler=None, *, drop_scheduler=False, name="sd"):
    """A copy of the tiny SD folder with another scheduler_config.json (or none)."""
    folder = tmp_path / name
    shutil.copytree(sd_world["model"], folder)
    if drop_scheduler:
        shutil.rmtree(folder / "scheduler")
    elif scheduler is not None:
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return str(folder)


def sd_pipe(folder):
    """diffusers' StableDiffusionPipeline over a local folder, without safety checker or progress bars."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
