"""Five sites train a small CNN on handwritten digits with DP-SGD, summed with SecAgg+.

The 8 x 8 digit images (1797, bundled with scikit-learn) are split over five sites. Each site trains the
CNN of :func:`fl.training.models.build_cnn` (two 3x3 convolutions, max-pooling, two linear layers) on
its own images with example-level DP-SGD: per-example gradients clipped in closed form (unfolded
convolutions, no Opacus needed; see :mod:`dp.sgd`), CSPRNG Gaussian noise; updates are then summed
with SecAgg+, so the server only sees the sum. The script prints three accuracies on the same test set:

- the same CNN trained centrally on all training images, without privacy (the reference);
- the federated CNN without privacy layers (the bar: within 3 points of the reference);
- the federated CNN with DP-SGD + SecAgg+, and the example-level epsilon the ledger composed.

Images travel as flat rows of 64 pixels scaled by the public range 0..16 (so no statistics of the
sites' data are needed); the model's first module reshapes each row into a 1 x 8 x 8 image.

    python examples/digits_cnn.py [--quick]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import Dataset
from fl.training.loop import train
from fl.training.models import build_cnn

PIXEL_MAX = 16.0  # digits' public pixel range is 0..16


def digits_images(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Digits as flat rows of 64 pixels in [0, 1] (public range, no data-dependent scaling), split
    stratified into training rows and the server's test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset(
        name="digits-images",
        x_train=(x_tr / PIXEL_MAX).astype(np.float32),
        y_train=y_tr.astype(np.int64),
        x_test=(x_te / PIXEL_MAX).astype(np.float32),
        y_test=y_te.astype(np.int64),
        feature_names=tuple(f"pixel_{i // 8}_{i % 8}" for i in range(64)),
        classes=tuple(str(c) for c in range(10)),
    )


dataset = digits_images()

config = TrainConfig(
    dataset="digits",  # informational: the rows come from ``dataset`` above
    clients=5,
    partition="iid",
    model="cnn",
    hidden=32,
    rounds=15,
    local_epochs=2,
    lr=1.0,  # DP-SGD: clipped per-example gradients are small, the step is large
    batch_size=32,
    seed=0,
    # clip: the L2 bound of each client's model update before quantization for SecAgg+ (not the DP clip;
    # the DP guarantee is DP-SGD's, per example): loose, so the sum carries the whole update
    privacy=PrivacyConfig(spec="dp-sgd,secagg+", epsilon=8.0, delta=1e-5, clip=20.0, dpsgd_clip=1.0,
                          dpsgd_batch_size=64),
)
nonprivate = replace(config, optimizer="sgd", lr=0.3, privacy=PrivacyConfig(spec="none"))


def central_accuracy(data: Dataset, *, epochs: int, lr: float = 0.1, batch_size: int = 32, seed: int = 0) -> float:
    """Test accuracy of the same CNN trained on all training rows at once, without privacy (plain SGD)."""
    model = build_cnn(data.num_features, len(data.classes), hidden=config.hidden, seed=seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x_test)).argmax(1)
    return float((pred == torch.from_numpy(data.y_test)).float().mean())


def run(*, rounds: int | None = None) -> dict[str, float]:
    """The three accuracies (central, federated, federated DP-SGD + SecAgg+) and the DP run's epsilon."""
    r = rounds or config.rounds
    fed = train(replace(nonprivate, rounds=r), baseline=False, dataset=dataset)
    dp = train(replace(config, rounds=r), baseline=False, dataset=dataset)
    return {
        # one central epoch sees each row once, as one federated round of local_epochs does per site
        "central": central_accuracy(dataset, epochs=r * nonprivate.local_epochs, lr=nonprivate.client_lr),
        "federated": fed["final"]["accuracy"],
        "federated_dp_secagg+": dp["final"]["accuracy"],
        "epsilon": dp["final"]["epsilon"],
        "delta": dp["final"]["delta"],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of the configured rounds")
    args = ap.parse_args()
    out = run(rounds=5 if args.quick else None)
    print(f"central CNN, no privacy:         {out['central']:.3f}")
    gap = 100 * (out["federated"] - out["central"])
    print(f"federated CNN, no privacy:       {out['federated']:.3f}  ({gap:+.1f} points)")
    print(f"federated CNN, DP-SGD + SecAgg+: {out['federated_dp_secagg+']:.3f}  "
          f"(epsilon {out['epsilon']:.2f}, delta {out['delta']:g}, per example)")
