"""The ClientApp: ordinary Flower Message API code; ``privagg_mod`` turns its train reply into SecAgg+ messages."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl.runners.flower.mod import privagg_mod
from privagg_app.task import load_data, make_model, train

app = ClientApp(mods=[privagg_mod])


def local_update(arrays: ArrayRecord, node_config: dict, run_config: dict, rnd: int) -> tuple[ArrayRecord, int, float]:
    """Train the global model on this node's data for round ``rnd``; the new weights, example count, loss."""
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = load_data(node_config)
    seed = 10_000 * rnd + int(node_config.get("partition-id", 0))
    loss = train(model, x, y, epochs=int(run_config["local-epochs"]), lr=float(run_config["learning-rate"]),
                 seed=seed)
    return ArrayRecord(model.state_dict()), len(x), loss


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    arrays, n, loss = local_update(msg.content["arrays"], dict(context.node_config), dict(context.run_config),
                                   int(msg.metadata.group_id))
    metrics = MetricRecord({"num-examples": n, "train-loss": loss})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
