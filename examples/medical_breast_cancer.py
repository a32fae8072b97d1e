"""Five hospitals train a breast-cancer classifier together; no hospital's update is seen in the clear.

Each hospital holds a label-skewed share of the Wisconsin breast-cancer data (bundled with
scikit-learn). Updates are clipped, quantized and summed with SecAgg+, so the server learns only the sum.

To use your own data: replace ``dataset`` with ``"csv:/path/to/patients.csv"``, set ``target`` to the
label column, and ``partition="by-column:hospital"`` if a column says which site each row comes from.

    python examples/medical_breast_cancer.py
"""

from __future__ import annotations

from pathlib import Path

from fl.config import PrivacyConfig, TrainConfig
from fl.report import plot_rounds, summary_lines, write_json
from fl.training.loop import train

config = TrainConfig(
    dataset="breast_cancer",  # or "csv:/path/to/your.csv" with target="outcome"
    clients=5,
    partition="dirichlet:0.5",  # or "by-column:hospital"
    model="logreg",
    rounds=20,
    seed=0,
    privacy=PrivacyConfig(spec="secagg+", clip=5.0, threshold=0.6),
)

if __name__ == "__main__":
    report = train(config, progress=True)
    print("\n".join(summary_lines(report)))
    out = Path("out/examples")
    write_json(report, out / "medical.json")
    plot_rounds(report, out / "medical.png")
