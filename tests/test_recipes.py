"""The shared BadNets recipes carry the settings the issue specifies."""
from bdjax import recipes


def test_badnets_mnist_recipe():
    cfg = recipes.badnets_mnist("small")
    a = cfg.attack
    assert (cfg.data.dataset, a.trigger, a.trigger_size, a.placement, a.label_map, a.target, a.poison_rate) == \
        ("mnist", "patch", 3, "bottom_right", "all_to_one", 0, 0.01)
    assert recipes.badnets_mnist("full").train.epochs > cfg.train.epochs


def test_badnets_cifar10_recipe():
    small, full = recipes.badnets_cifar10("small"), recipes.badnets_cifar10("full")
    assert small.attack.poison_rate == full.attack.poison_rate == 0.05 and small.attack.trigger_size == 3
    assert small.train.model == "cifar_cnn"
    assert (full.train.model, full.train.weight_decay, full.train.lr, full.train.batch_size) == ("resnet18", 2e-4, 0.1, 128)
