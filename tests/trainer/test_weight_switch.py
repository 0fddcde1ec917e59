"""Two-step weights (issue 18): a stage that starts from the previous one with other weight bits
switches them. After ``decouple`` the decoupling is checked on the previous bits (the
decoupling's own result, exact), then the switch is logged with its accuracy before training;
the switched network is exactly the binary-weight network of the same latent weights."""
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from binaryduo import models

pytestmark = pytest.mark.slow

FP_COUPLED_THEN_BINARY = {
    # coupled with FP weights -> decouple -> fine-tune with binary weights
    "options: {width_mult: 0.25,": "options: {width_mult: 0.25, weight_bits: 32,",
    "    transition: decouple\n": "    transition: decouple\n    weight_bits: 1\n",
}

BNN_FP_THEN_BINARY = """\
name: tiny-two-step
seed: 3
model:
  name: vgg7
  options: {width_mult: 0.25, num_classes: 10, in_channels: 1, weight_bits: 32}
data: {root: DATA, preset: small, channels: 1, batch_size: 64, train_subset: 256, val_subset: 101}
stages:
  - {name: fp_weights, variant: bnn, epochs: 1, optimizer: {lr: 0.05}}
  - {name: binary_weights, variant: bnn, epochs: 1, init_from: previous, weight_bits: 1,
     optimizer: {name: adamw, lr: 0.001, weight_decay: 0.0}, schedule: {kind: linear}}
"""


def _train(tmp_path, text, run_binaryduo):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    run_binaryduo("train", recipe, "--smoke", "--output", "run",
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return recipe, state, client


def test_decouple_then_switch_to_binary_weights(tmp_path, fashion_mnist, tiny_recipe_text,
                                                run_binaryduo):
    text = tiny_recipe_text.replace("DATA", str(fashion_mnist))
    for old, new in FP_COUPLED_THEN_BINARY.items():
        assert text.count(old) == 1
        text = text.replace(old, new)
    recipe_path, state, client = _train(tmp_path, text, run_binaryduo)

    finetune = client.get_run(state["stage_run_ids"]["finetune"])
    metrics = finetune.data.metrics
    # the decoupling check ran on the FP-weight decoupled network: exact
    assert metrics["decouple_changed_predictions_f64"] == 0
    assert metrics["decouple_max_abs_dlogit_f64"] <= 1e-9
    check = json.loads((tmp_path / "run" / "decoupling_check_finetune.json").read_text())
    assert check["passed"]
    assert (metrics["weight_switch_from_bits"], metrics["weight_switch_to_bits"]) == (32, 1)
    assert metrics["weight_switch_source_val_top1"] == metrics["decouple_decoupled_val_top1"]
    history = client.get_metric_history(finetune.info.run_id, "weight_switch_val_top1")
    assert [m.step for m in history] == [0]  # the switch is its own step, before training
    step0 = {m.step: m.value for m in client.get_metric_history(finetune.info.run_id, "val_top1")}
    assert step0[0] == metrics["weight_switch_val_top1"]
    # the fine-tune's cost is the binary-weight network's
    costs = json.loads((tmp_path / "run" / "cost_finetune.json").read_text())
    coupled_costs = json.loads((tmp_path / "run" / "cost_coupled.json").read_text())
    assert costs["mbit"] < coupled_costs["mbit"]

    # the switched start is the binary-weight network of the decoupled latent weights
    from binaryduo.trainer.recipe import load_recipe
    from binaryduo.trainer.run.checkpoint import StageCheckpoints, load_model_state
    from binaryduo.trainer.run.transitions import build_stage_model, initial_weights

    recipe = load_recipe(recipe_path, [])
    torch.manual_seed(0)
    start, pending = initial_weights(recipe, 1, build_stage_model(recipe, recipe.stages[1]),
                                     output_dir=tmp_path / "run")
    assert pending.switched_from == 32
    coupled = models.build("vgg7", "coupled", width_mult=0.25, num_classes=10, in_channels=1,
                           weight_bits=32)
    source = StageCheckpoints(tmp_path / "run" / "checkpoints" / "coupled", keep_last=1,
                              is_main=False)
    coupled.load_state_dict(load_model_state(source.verified_model_file("best")))
    reference = models.build("vgg7", "decoupled", width_mult=0.25, num_classes=10,
                             in_channels=1, weight_bits=1)
    reference.load_state_dict(models.decouple(coupled).state_dict())
    convs = [m for m in start.modules() if isinstance(m, models.QConv2d)]
    assert convs and all(m.weight_bits == 1 for m in convs)
    for conv in convs:  # alpha*sign(latent W), alpha = mean|W|
        latent = conv.weight.detach()
        assert torch.equal(conv.quantized_weight().detach(),
                           latent.abs().mean() * torch.sign(latent))
    # two smoke steps leave every image with the same logits: give both the same BN statistics
    # near real data (random, seeded) so outputs differ from image to image
    images = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for model in (start, reference):
        models.testing.randomize_batchnorm_near_data_(model, images,
                                                      torch.Generator().manual_seed(1))
    fp_twin = models.build("vgg7", "decoupled", width_mult=0.25, num_classes=10, in_channels=1,
                           weight_bits=32)
    fp_twin.load_state_dict(start.state_dict())  # same latent weights and BN, FP weights
    fp_twin.eval()
    with torch.no_grad():
        switched = start(images)
        assert switched.std(dim=0).min() > 0  # the check below compares real outputs
        assert torch.equal(switched, reference(images))
        # and not the FP-weight network's outputs: the switch changed the computation
        assert not torch.allclose(switched, fp_twin(images), atol=1e-3)


def test_switch_without_decoupling_logs_its_step(tmp_path, fashion_mnist, run_binaryduo):
    _, state, client = _train(tmp_path, BNN_FP_THEN_BINARY.replace("DATA", str(fashion_mnist)),
                              run_binaryduo)
    stage = client.get_run(state["stage_run_ids"]["binary_weights"])
    metrics = stage.data.metrics
    assert (metrics["weight_switch_from_bits"], metrics["weight_switch_to_bits"]) == (32, 1)
    source = client.get_run(state["stage_run_ids"]["fp_weights"]).data.metrics["val_top1"]
    assert metrics["weight_switch_source_val_top1"] == source
    history = client.get_metric_history(stage.info.run_id, "weight_switch_val_top1")
    assert [m.step for m in history] == [0]
    assert "decouple_max_abs_dlogit_f64" not in metrics


def test_stage_weight_bits_are_validated(tmp_path, fashion_mnist):
    from binaryduo.trainer.recipe import RecipeError, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(BNN_FP_THEN_BINARY.replace("DATA", str(fashion_mnist)))
    recipe = load_recipe(path, [])
    assert recipe.model_options(recipe.stages[1])["weight_bits"] == 1
    assert recipe.model_options(recipe.stages[0])["weight_bits"] == 32
    with pytest.raises(RecipeError, match="weight_bits"):
        load_recipe(path, ["stages.binary_weights.weight_bits=2"])
