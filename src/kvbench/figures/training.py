"""Loss curves of the models trained here (their `training_log.csv`): raw and a 50-step mean."""

from __future__ import annotations

import os

from . import Figure, register


def plot(model_dirs: list[str], out_dir: str) -> list[str]:
    """Loss curves of the models trained here (their `training_log.csv`): raw and a 50-step mean."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from ._draw import no_data, save

    title = "Training loss of the builtin models"
    cols = ["model", "step", "length", "loss", "loss_mean50", "lr", "seconds"]
    logs = [(os.path.basename(os.path.normpath(d)), os.path.join(d, "training_log.csv")) for d in model_dirs]
    logs = [(m, f) for m, f in logs if os.path.exists(f)]
    if not logs:
        return save(no_data(title), pd.DataFrame(columns=cols), out_dir, "training")
    frames = []
    for model, f in logs:
        d = pd.read_csv(f)
        d.insert(0, "model", model)
        d["loss_mean50"] = d["loss"].rolling(50, min_periods=1).mean()
        frames.append(d)
    data = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, len(logs), squeeze=False, figsize=(6.5 * len(logs), 3.6))
    for ax, (model, _) in zip(axes[0], logs):
        d = data[data["model"] == model]
        ax.plot(d["step"], d["loss"], color="0.75", lw=0.6, label="per step")
        ax.plot(d["step"], d["loss_mean50"], color="C0", lw=1.8, label="mean of 50 steps")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss on target tokens (nats, log scale)")
        minutes = d["seconds"].iloc[-1] / 60
        ax.set_title(f"{model}: {len(d)} steps, {minutes:.0f} min, final mean {d['loss_mean50'].iloc[-1]:.3f}")
        ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, data[cols], out_dir, "training")


register(Figure("training", (), plot, reads="models"))
