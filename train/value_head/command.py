"""``alignd train value-head``: open the run, make its data (rollout or implicit targets), fit the head
with a learning curve and publish the head folder."""

from __future__ import annotations

from pathlib import Path

from alignd.train.data import TrainingError
from alignd.train.manifest import jsonable
from alignd.train.value_head.cache import keep_data
from alignd.train.value_head.context import _MadeData, _RunContext, open_run
from alignd.train.value_head.dataset import head_data
from alignd.train.value_head.fit import fit_and_evaluate
from alignd.train.value_head.manifest import head_manifest
from alignd.train.value_head.options import MAX_HEAD_BYTES, PLOT_FILE, ValueHeadRun
from alignd.train.value_head.plot import plot_learning_curve
from alignd.train.value_head.rollouts import rollout_data


def run_value_head(run: ValueHeadRun) -> Path:
    """Make the states and targets (resumably), compute the features, train with a learning curve and
    publish the head folder at ``run.out``; returns it. With ``run.shard``: make that shard's states only
    and return the partial folder."""
    ctx = open_run(run)
    if run.targets.kind == "implicit":
        from alignd.train.implicit_targets import make_implicit_data

        made = make_implicit_data(ctx)
    else:
        made = rollout_data(ctx)
        if made is None:
            return ctx.workspace.partial
    return _train_and_publish(ctx, made)


def _train_and_publish(ctx: _RunContext, made: _MadeData) -> Path:
    """Fit the head on the made data, write its folder (plot, weights, manifest), keep the data in the
    cache and publish the folder at ``run.out``."""
    from alignd.models.value_head import save_value_head

    data = head_data(made.records, made.features)
    trained = fit_and_evaluate(data, ctx.run.training, ctx.vocab_size, ctx.inputs["seed"])
    manifest = head_manifest(ctx, made, data, trained)
    folder = ctx.workspace.fresh_result_dir()
    plot_learning_curve(
        trained.curve,
        folder / PLOT_FILE,
        f"{ctx.model_name}: value head for '{ctx.inputs['reward']}', "
        f"{made.manifest['targets']} targets of baseline '{ctx.baseline.name}'",
        alpha=ctx.run.training.alpha,
        targets=made.manifest["targets"],
    )
    save_value_head(trained.fitted.head, folder, jsonable(manifest))
    keep_data(ctx.workspace.partial, ctx.cache)
    size = sum(p.stat().st_size for p in folder.iterdir())
    if size > MAX_HEAD_BYTES:
        raise TrainingError(
            f"the head folder is {size / 2**20:.1f} MiB, above the 10 MiB a head may have: lower --rank"
        )
    return ctx.workspace.publish()
