"""InfoPro: the released code's λ schedule, aux nets and decoder; the loss; messages carrying the image;
both executors. (Registry-wide guarantees: tests/test_every_rule.py, tests/test_train.py.)"""
import pytest
import torch
import torch.nn.functional as F
from conftest import quick_config
from test_local_rules import _layers

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.rules import get_rule, make_options
from bpfree.rules.infopro import (
    Decoder,
    aux_net,
    lambda_schedule,
    released_lambdas,
    supervised_contrastive,
)
from bpfree.run import build, train

CNN = {"model": "cnn", "model_options": {"widths": (8, 16, 16)}, "blocks": 3}


# --- the released configuration --------------------------------------------------------------------
def test_lambdas_interpolate_over_the_local_modules_as_released():
    # resnet.py: ratio = i / (K - 2) over the K-1 local modules; K=2 uses the first values only
    assert lambda_schedule((5, 1), (0, 0), 2) == [(5, 1)]
    assert lambda_schedule(*[released_lambdas(4)[:2], released_lambdas(4)[2:]], 4) == [(6, 0), (3.5, 1), (1, 2)]
    sixteen = lambda_schedule((5, 0.05), (0.2, 0.5), 16)
    assert len(sixteen) == 15 and sixteen[0] == (5, 0.05) and sixteen[-1] == pytest.approx((0.2, 0.5))
    assert sixteen[7] == pytest.approx((2.6, 0.275))
    # comand.sh's ResNet-32 CIFAR-10 values; another K takes the largest released K below it
    assert released_lambdas(8) == (5, 0, 0, 2) and released_lambdas(16) == (5, 0.05, 0.2, 0.5)
    assert released_lambdas(3) == released_lambdas(2) and released_lambdas(12) == released_lambdas(8)
    assert released_lambdas(55) == released_lambdas(16) and released_lambdas(1) == released_lambdas(2)


def test_the_rule_uses_the_released_lambdas_unless_given(digits):
    rule = build(quick_config(method="infopro", model="resnet32", blocks=4, model_options={}), digits)
    assert [(s.lambda_x, s.lambda_y) for s in rule.stages[:-1]] == [(6, 0), (3.5, 1), (1, 2)]
    assert rule.stages[-1].decoder is None and rule.stages[-1].objective.classifier is rule.net.head
    mine = build(quick_config(method="infopro", model="resnet32", blocks=4, model_options={},
                                rule_options={"ixy_1": 1.0}), digits)
    assert [s.lambda_y for s in mine.stages[:-1]] == [1, 1.5, 2]


# layers of the released AuxClassifier '1c2f' (auxiliary_nets.py) on resnet32's 16, 32, 64 channels
RELEASED_1C2F = {
    16: ["conv3x3:16->32", "2dbn:32", "relu", "linear:32->128", "relu", "linear:128->10"],
    32: ["conv3x3:32->64", "2dbn:64", "relu", "linear:64->128", "relu", "linear:128->10"],
    64: ["conv3x3:64->64", "2dbn:64", "relu", "linear:64->128", "relu", "linear:128->10"],
}


@pytest.mark.parametrize("channels", [16, 32, 64])
def test_aux_net_1c2f_is_the_released_one(channels):
    net = aux_net("1c2f", (channels, 8, 8), 64, 10)
    assert [x for x in _layers(net) if not x.startswith("avgpool")] == RELEASED_1C2F[channels]
    assert net[0].stride == ((2, 2) if channels < 64 else (1, 1))
    assert net(torch.randn(2, channels, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("config, layers", [
    ("0c1f", ["linear:16->10"]),
    ("0c2f", ["linear:16->128", "relu", "linear:128->10"]),
    ("1c1f", ["conv3x3:16->32", "2dbn:32", "relu", "linear:32->10"]),
    ("1c3f", ["conv3x3:16->32", "2dbn:32", "relu", "linear:32->128", "relu", "linear:128->128", "relu",
              "linear:128->10"]),
    ("2c2f", ["conv3x3:16->32", "2dbn:32", "relu", "conv3x3:32->32", "2dbn:32", "relu", "linear:32->128", "relu",
              "linear:128->10"]),
])
def test_aux_net_configs(config, layers):
    assert [x for x in _layers(aux_net(config, (16, 8, 8), 64, 10)) if not x.startswith("avgpool")] == layers
    widened = aux_net(config, (16, 8, 8), 64, 10, widen=2, feature_dim=32)
    assert widened(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    assert aux_net(config, (40,), 40, 10)(torch.randn(3, 40)).shape == (3, 10)     # vector features


def test_decoder_reconstructs_the_input_shape():
    decoder = Decoder((16, 4, 4), (3, 32, 32))
    assert _layers(decoder) == ["conv3x3:16->12", "2dbn:12", "relu", "conv3x3:12->3"]    # the released Decoder
    assert decoder(torch.randn(2, 16, 4, 4)).shape == (2, 3, 32, 32)
    assert Decoder((16, 4, 4), (1, 8, 8), upsample="nearest")(torch.randn(2, 16, 4, 4)).shape == (2, 1, 8, 8)
    vector = Decoder((32,), (1, 8, 8))                       # an mlp on images: reconstruct the flattened image
    assert _layers(vector) == ["linear:32->32", "1dbn:32", "relu", "linear:32->64"]
    assert vector(torch.randn(2, 32)).shape == (2, 1, 8, 8) and Decoder((32,), (64,))(torch.randn(2, 32)).shape == (2, 64)


def test_supervised_contrastive_loss_is_khosla_et_als():
    torch.manual_seed(0)
    z, y = F.normalize(torch.randn(6, 5), dim=1), torch.tensor([0, 0, 1, 1, 1, 2])
    expected = []
    for i in range(6):            # anchor i: mean over positives p of -log softmax over the others
        others = [j for j in range(6) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.07 for j in others])
        log_prob = logits - torch.logsumexp(logits, 0)
        pos = [log_prob[n] for n, j in enumerate(others) if y[j] == y[i]]
        expected.append(-torch.stack(pos).mean() if pos else torch.tensor(0.0))   # class 2 has no positive
    assert torch.allclose(supervised_contrastive(z, y), torch.stack(expected).mean())
    clustered = F.normalize(F.one_hot(y, 5).float() + 0.01 * torch.randn(6, 5), dim=1)
    assert supervised_contrastive(clustered, y) < supervised_contrastive(z, y)


def test_sequential_schedule_is_refused(digits):
    with pytest.raises(BpfreeError, match="schedule"):
        train(quick_config(method="infopro", schedule="sequential"), data=digits, quiet=True)


def test_negative_lambda_is_refused():
    with pytest.raises(BpfreeError, match="--ixx-1"):
        make_options(get_rule("infopro"), {"ixx_1": -1.0})


# --- the local update -------------------------------------------------------------------------------
def _rule(digits, **options):
    cfg = quick_config(method="infopro", **CNN, rule_options=options)
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)       # configures the optimizers
    return rule


def test_messages_carry_the_image_and_prediction_is_the_network(digits):
    rule = _rule(digits)
    x, y = digits.x_train[:16], digits.y_train[:16]
    message = (x,)
    for k, stage in enumerate(rule.stages):
        message = stage.step(message, y)
        last = k == len(rule.stages) - 1
        assert len(message) == (1 if last else 2)
        assert last or torch.equal(message[1], x)         # the (here un-augmented) image rides along
    rule.stages.eval()
    assert torch.equal(rule.predict(x), rule.net(x))


def test_the_local_loss_is_lambda_weighted_reconstruction_plus_aux_loss(digits):
    rule = _rule(digits, ixx_1=0.7, ixy_1=0.3)
    stage, x, y = rule.stages[0], digits.x_train[:16], digits.y_train[:16]
    out = stage.local((x,), y)
    h = stage.block(x)
    expected = 0.7 * F.mse_loss(stage.decoder(h), x) + 0.3 * F.cross_entropy(stage.objective.classifier(h), y)
    assert torch.allclose(out.loss, expected)
    assert torch.equal(out.logits, stage.objective.classifier(h))


@pytest.mark.parametrize("term", ["reconstruction", "aux"])
def test_each_term_alone_trains_the_block_and_its_own_network_only(term, digits):
    weights = {"ixx_1": 1.0, "ixy_1": 0.0} if term == "reconstruction" else {"ixx_1": 0.0, "ixy_1": 1.0}
    stage = _rule(digits, **weights, ixx_2=0.0, ixy_2=0.0).stages[0]
    stage.step((digits.x_train[:16],), digits.y_train[:16])
    used, unused = (stage.decoder, stage.objective) if term == "reconstruction" else (stage.objective, stage.decoder)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.block.parameters())
    assert all(p.grad is not None for p in used.parameters())
    assert all(p.grad is None or not p.grad.any() for p in unused.parameters())


def test_contrast_modules_have_no_class_readout(digits):
    rule = _rule(digits, aux_loss="contrast")
    out = rule.stages[0].local((digits.x_train[:16],), digits.y_train[:16])
    assert out.logits is None and out.loss > 0
    _, readouts = rule.outputs(digits.x_test[:4])
    assert readouts[0] is None and readouts[-1].shape == (4, 10)


def test_resnet32_cut_at_every_block_learns_digits():
    summary = train(quick_config(method="infopro", model="resnet32", blocks=16, epochs=2, model_options={},
                                 train_subset=400, batch_size=32, threads=1), quiet=True)
    assert len(summary["stages"]) == 16 and summary["test_accuracy"] > 0.2      # chance: 0.1


# --- executors ---------------------------------------------------------------------------------------
def test_parallel_run_equals_one_process_run():
    # (h, x) messages, channels-last images, within a rank and between ranks: identical learning
    cfg = quick_config(method="infopro", **CNN, train_subset=200, batch_size=32, threads=1)
    one, two = train(cfg), train(cfg, parallel=2)
    assert one["test_accuracy"] == two["test_accuracy"] and one["stages"] == two["stages"]
    assert one["peak_activation_bytes"] == two["peak_activation_bytes"]


def test_a_module_with_no_aux_weight_has_no_readout_and_its_aux_net_never_trains(digits):
    """Released K=4: module 1 has λ2 = 0. Its classifier would only log chance as a 'readout'."""
    cfg = quick_config(method="infopro", model="mlp", blocks=4, epochs=1)
    rule = build(cfg, digits)
    summary = Trainer(rule, digits, cfg, quiet=True).fit()
    first, second = rule.stages[0], rule.stages[1]
    assert (first.lambda_y, second.lambda_y) == (0, 1)
    assert all(p.grad is None for p in first.objective.parameters())
    assert any(p.grad is not None for p in second.objective.parameters())
    assert "test_acc" not in summary["stages"][0] and "train_acc" not in summary["stages"][0]
    assert "test_acc" in summary["stages"][1]
