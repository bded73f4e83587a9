"""Training: data loaders, bad-data messages, a tiny end-to-end run into a store, parity and versioning."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.metadata import ModelMetadata
from service.model import OnnxModel
from service.preprocessing import InputSpec, decode, normalize
from service.registry import ModelRegistry
from service.settings import Settings
from tests.helpers import encode, pattern
from training import data
from training import train as training_loop
from training.__main__ import main
from training.config import PRESETS, TrainConfig, field_help
from training.export import Classifier, ParityError, check_parity, write_graphs
from training.models import LeNet, build, keep_first_classes
from training.train import augment, cutmix, self_distill_share

LABELS = ["dog", "cat", "boat", "bird"]


def write_tree(root: Path, labels=LABELS, per_label: int = 10, size=(32, 32)) -> Path:
    """Class-per-folder tree of synthetic images; each label has its own colour cast so something is learnable."""
    for index, label in enumerate(labels):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_label):
            pixels = pattern(*size, seed=index * 1000 + i).astype(np.int32)
            pixels[..., index % 3] = (pixels[..., index % 3] + 90 * (1 + index // 3)).clip(0, 255)
            (folder / f"{i:04d}.png").write_bytes(encode(pixels.astype(np.uint8), "PNG"))
    return root


def write_cifar_batches(folder: Path, per_batch: int = 20) -> dict:
    """Real CIFAR-10 python-batch format: pickled dicts with bytes keys, rows of 3072 = R plane, G plane, B plane."""
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, handle, protocol=2)
    rng = np.random.default_rng(0)
    written = {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with (folder / batch).open("wb") as handle:
            pickle.dump({b"data": rows, b"labels": labels, b"batch_label": batch.encode()}, handle, protocol=2)
        written[batch] = (images, labels)
    return written


# --- data --------------------------------------------------------------------------------------------------------

def test_tree_loader_reads_labels_in_product_order(tmp_path):
    root = write_tree(tmp_path / "tree", per_label=3)
    loaded = data.load(root, progress=False)
    assert loaded.label_names == LABELS
    assert loaded.images.shape == (12, 32, 32, 3)
    assert loaded.counts() == {label: 3 for label in LABELS}
    assert list(loaded.labels[:3]) == [0, 0, 0] and list(loaded.labels[-3:]) == [3, 3, 3]


def test_cifar_batches_select_four_labels_and_rename_ship(tmp_path):
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    loaded = data.load(tmp_path, progress=False)  # finds cifar-10-batches-py below the root
    assert loaded.label_names == LABELS
    assert loaded.counts() == {label: 10 for label in LABELS}  # 2 per batch × 5 batches
    images, labels = written["data_batch_1"]
    first_ship = labels.index(8)
    boat = np.flatnonzero(loaded.labels == LABELS.index("boat"))[0]
    assert np.array_equal(loaded.images[boat], images[first_ship])  # pixel layout (R, G, B planes) is right
    test = data.load(tmp_path / "cifar-10-batches-py", cifar_split="test")
    assert len(test.labels) == 8


def test_cifar_batches_give_the_other_six_classes_as_extra(tmp_path):
    write_cifar_batches(tmp_path / "c")
    extra = data.load(tmp_path / "c", labels=None)
    assert extra.label_names == ["airplane", "automobile", "deer", "frog", "horse", "truck"]


def test_split_is_stratified_and_seeded(tmp_path):
    loaded = data.load(write_tree(tmp_path / "t", per_label=10), progress=False)
    train, val = data.split(loaded, 0.2, seed=3)
    assert val.counts() == {label: 2 for label in LABELS}
    assert train.counts() == {label: 8 for label in LABELS}
    _, again = data.split(loaded, 0.2, seed=3)
    assert np.array_equal(val.images, again.images)


def _bad_tree(tmp_path: Path, case: str) -> tuple[Path, str]:
    root = tmp_path / "data"
    if case == "missing":
        return root, "does not exist"
    if case == "file":
        root.write_text("x")
        return root, "is a file"
    root.mkdir()
    if case == "empty":
        return root, "has no label folders"
    write_tree(root, per_label=2)
    if case == "unknown label":
        (root / "horse").mkdir()
        return root, "Unknown label folder " + str(root / "horse")
    if case == "missing label":
        for f in (root / "bird").iterdir():
            f.unlink()
        (root / "bird").rmdir()
        return root, "Missing label folder " + str(root / "bird")
    if case == "empty label":
        for f in (root / "cat").iterdir():
            f.unlink()
        return root, "Label folder " + str(root / "cat") + " is empty"
    if case == "non-image":
        (root / "dog" / "notes.txt").write_text("hello")
        return root, str(root / "dog" / "notes.txt") + " is not an image file"
    if case == "corrupt":
        (root / "boat" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        return root, str(root / "boat" / "0001.png") + " could not be read as an image"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "unknown label", "missing label", "empty label",
                                  "non-image", "corrupt"])
def test_bad_data_fails_early_naming_the_culprit(tmp_path, case):
    root, message = _bad_tree(tmp_path, case)
    with pytest.raises(data.DataError) as error:
        data.load(root, progress=False)
    assert message in str(error.value)


def test_bad_cifar_batch_is_named(tmp_path):
    write_cifar_batches(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="data_batch_3 is not a readable CIFAR-10 python batch"):
        data.load(tmp_path / "c")


def test_cli_reports_bad_data_without_a_traceback(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s")]) == 2
    assert "error: Data root" in capsys.readouterr().err


# --- preprocessing identity ----------------------------------------------------------------------------------------

def test_training_reads_images_exactly_as_the_service_preprocesses_them(tmp_path):
    spec = InputSpec(height=32, width=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    photos = {
        "a.jpg": encode(pattern(1920, 1080, seed=1), "JPEG", quality=90),
        "b.png": encode(pattern(32, 32, seed=2), "PNG"),
        "c.webp": encode(pattern(300, 500, seed=3), "WEBP"),
        "d.png": encode(pattern(50, 40, seed=4), "PNG", mode="RGBA"),
    }
    root = tmp_path / "tree"
    for label in LABELS:
        (root / label).mkdir(parents=True)
    for name, payload in photos.items():
        (root / "dog" / name).write_bytes(payload)
    for label in LABELS[1:]:
        (root / label / "x.png").write_bytes(photos["b.png"])
    training_side = normalize(data.load(root, spec=spec, progress=False).images, spec)
    service_side = normalize(np.stack([decode(photos[name], spec) for name in sorted(photos)]), spec)
    assert np.array_equal(training_side[:4], service_side)


# --- model pieces --------------------------------------------------------------------------------------------------

def test_lenet_has_the_classic_shapes():
    stages = {name: tuple(v.shape[1:]) for name, _, v in LeNet(4).forward_stages(torch.zeros(1, 3, 32, 32))}
    assert stages["conv1"] == (6, 28, 28) and stages["pool1"] == (6, 14, 14)
    assert stages["conv2"] == (16, 10, 10) and stages["pool2"] == (16, 5, 5)
    assert (stages["fc1"], stages["fc2"], stages["fc3"]) == ((120,), (100,), (4,))


def test_keep_first_classes_keeps_the_product_logits():
    model = build("convnet", 10, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)[:, :4]
    after = keep_first_classes(model, 4)(x)
    assert after.shape == (3, 4) and torch.allclose(before, after)


def test_residual_blocks_add_their_branch_to_the_block_output():
    model = build("convnet", 4, width=8, residual=(1, 3)).eval()
    stages = model.forward_stages(torch.randn(2, 3, 32, 32))
    by_name = {name: (kind, value) for name, kind, value in stages}
    assert by_name["block1_res_add"][0] == "add" and "block2_res_add" not in by_name
    # The last block's sum is what the head pools (and what class activation maps are made of).
    kind, features = by_name[model.cam_stage]
    assert kind == "add"
    assert torch.allclose(features, by_name["block3_relu2"][1] + by_name["block3_res_relu2"][1])
    assert torch.allclose(by_name["global_pool"][1], features.mean(dim=(2, 3)))
    plain = build("convnet", 4, width=8).eval()
    assert all(kind != "add" for _, kind, _ in plain.forward_stages(torch.zeros(1, 3, 32, 32)))


def test_augment_keeps_shapes_and_is_seeded():
    config = TrainConfig(flip=True, translate=4, cutout=8)
    x = torch.randn(16, 3, 32, 32)
    first = augment(x, config, torch.Generator().manual_seed(1))
    second = augment(x, config, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and torch.equal(first, second) and not torch.equal(first, x)
    assert (first == 0).flatten(1).sum(1).min() > 0  # every image has a cutout square


def test_cutmix_pastes_one_box_from_a_partner_and_weighs_targets_by_area():
    x = torch.arange(8 * 3 * 32 * 32, dtype=torch.float32).reshape(8, 3, 32, 32)  # every pixel distinct
    targets = torch.arange(8)
    generator = torch.Generator().manual_seed(0)
    mixed_batches = 0
    for _ in range(20):
        mixed, pasted_targets, kept = cutmix(x, targets, 1.0, generator)
        assert mixed.shape == x.shape and 0.0 <= kept <= 1.0
        # Each image is its own outside one shared box, and its partner's inside it.
        changed = (mixed != x).any(1)
        for image in range(8):
            partner = int(pasted_targets[image])
            inside = (mixed[image] == x[partner]).all(0)
            assert bool((inside | ~changed[image]).all())
            if partner != image:
                assert abs(float(inside.float().mean()) - (1.0 - kept)) < 1e-6
        mixed_batches += kept < 1.0
    assert mixed_batches >= 15  # probability 1: only an empty box leaves a batch whole
    unmixed, same_targets, kept = cutmix(x, targets, 0.0, generator)
    assert unmixed is x and same_targets is targets and kept == 1.0


def test_every_hyperparameter_is_described_and_presets_are_valid():
    described = field_help()
    assert all(description for _, description, _ in described.values())
    for name, overrides in PRESETS.items():
        assert set(overrides) <= set(described), name
        TrainConfig(**overrides)


# --- end to end ------------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tree = write_tree(root / "data", per_label=12)
    extra = write_tree(root / "extra", labels=["horse", "frog"], per_label=6)
    store = root / "store"
    code = main(["train", "--data", str(tree), "--extra-data", str(extra), "--store", str(store), "--preset", "smoke",
                 "--arch", "convnet", "--width", "8", "--residual", "3", "--val-fraction", "0.25", "--no-progress",
                 "--extra-classes", "--epochs", "2", "--focus-epochs", "1", "--cutmix", "1", "--batch-size", "12"])
    assert code == 0
    return store, tree


def test_tiny_run_writes_a_complete_version(tiny_run):
    store, _ = tiny_run
    folder = store / "convnet-smoke" / "1"
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "inspect.onnx", "filters.npy", "metadata.json", "metrics.json", "confusion_matrix.png",
            "training_curves.png", "reliability.png"} <= names
    assert ModelMetadata.read(folder / "metadata.json").labels == LABELS  # the service's schema reads it
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["labels"] == LABELS
    for role in ("model", "inspect", "filters"):
        stored = metadata["files"][role]
        assert stored["sha256"] == hashlib.sha256((folder / stored["path"]).read_bytes()).hexdigest()
    assert metadata["input"]["shape"] == [-1, 3, 32, 32]
    assert set(metadata["input"]["preprocessing"]) >= {"height", "width", "mean", "std", "scale", "resize"}
    assert metadata["training"]["config"]["arch"] == "convnet"
    assert 0 <= metadata["training"]["wall_time_s"] <= metadata["training"]["total_wall_time_s"]
    exported_on = metadata["training"]["exported_on"]
    assert exported_on["versions"]["torch"] and exported_on["hardware"]["cpu_count"]
    # A quarter of the other classes is held out: the "none of these" rule is measured on images never trained on.
    assert metadata["data"]["extra_counts"] == {"horse": 4, "frog": 4}
    assert metadata["data"]["other_validation_counts"] == {"horse": 2, "frog": 2}
    assert metadata["data"]["validation_counts"] == {label: 3 for label in LABELS}
    assert set(metadata["metrics"]["validation"]["per_class"]) == set(LABELS)
    assert all(check["max_abs_diff"] <= 1e-4 for check in metadata["parity"].values())
    assert metadata["inspection"]["class_maps"] == "class_maps"
    # 36 product + 8 extra training images in batches of 12: 4 steps on all, then 3 on the product labels only.
    assert metadata["training"]["steps"] == 4 + 3
    history = json.loads((folder / "metrics.json").read_text())["history"]
    assert [row["focus"] for row in history] == [False, True]
    assert metadata["training"]["config"]["cutmix"] == 1.0


def test_tiny_run_is_loadable_by_the_service(tiny_run):
    store, _ = tiny_run
    model = OnnxModel(store / "convnet-smoke" / "1")
    model.load()
    assert model.ready and model.labels == LABELS
    outputs = model.predict(np.zeros((2, 3, 32, 32), np.float32))
    assert outputs.probabilities.shape == (2, 4) and np.allclose(outputs.probabilities.sum(1), 1, atol=1e-5)
    assert outputs.domain_score.shape == (2,) and outputs.in_domain.dtype == np.bool_
    registry = ModelRegistry(Settings.from_env({}, MODEL_STORE=store, DEFAULT_MODEL="convnet-smoke"))
    registry.load_all()
    assert registry.ready and registry.get().version == "1"


def test_a_new_run_writes_the_next_version_and_never_overwrites(tiny_run):
    store, tree = tiny_run
    first = (store / "convnet-smoke" / "1" / "model.onnx").read_bytes()
    assert main(["train", "--data", str(tree), "--store", str(store), "--preset", "smoke", "--arch", "convnet",
                 "--width", "8", "--val-fraction", "0.25", "--no-progress"]) == 0
    assert (store / "convnet-smoke" / "2" / "metadata.json").is_file()
    assert (store / "convnet-smoke" / "1" / "model.onnx").read_bytes() == first
    assert not [p for p in (store / "convnet-smoke").iterdir() if p.name.startswith(".staging")]


def test_training_is_deterministic_under_a_seed(tmp_path):
    tree = write_tree(tmp_path / "data", per_label=8)
    results = []
    for run in range(2):
        store = tmp_path / f"store{run}"
        assert main(["train", "--data", str(tree), "--store", str(store), "--preset", "smoke", "--seed", "7",
                     "--val-fraction", "0.25", "--no-progress"]) == 0
        results.append(json.loads((store / "lenet-smoke" / "1" / "metrics.json").read_text())["validation"])
    assert results[0] == results[1]


def test_an_interrupted_run_goes_on_from_its_checkpoint_to_the_same_model(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "data", per_label=8)
    checkpoint = tmp_path / "run.ckpt"

    def train(store: str, *extra: str) -> int:
        return main(["train", "--data", str(tree), "--store", str(tmp_path / store), "--preset", "smoke",
                     "--arch", "convnet", "--width", "8", "--epochs", "3", "--ema-decay", "0.9",
                     "--self-distill", "0.5", "--val-fraction", "0.25", "--no-progress", *extra])

    assert train("straight") == 0
    real_save = training_loop.save_checkpoint

    def save_then_die(path, **state):
        real_save(path, **state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # as if the machine went away after epoch 2

    monkeypatch.setattr(training_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train("resumed", "--checkpoint", str(checkpoint))
    assert not (tmp_path / "resumed" / "convnet-smoke" / "1").exists()
    monkeypatch.setattr(training_loop, "save_checkpoint", real_save)
    assert train("resumed", "--checkpoint", str(checkpoint)) == 0
    straight, resumed = (json.loads((tmp_path / store / "convnet-smoke" / "1" / "metrics.json").read_text())
                         for store in ("straight", "resumed"))
    assert resumed["validation"] == straight["validation"]
    assert [row["train_loss"] for row in resumed["history"]] == [row["train_loss"] for row in straight["history"]]
    metadata = json.loads((tmp_path / "resumed" / "convnet-smoke" / "1" / "metadata.json").read_text())
    assert metadata["training"]["resumed"] == {"after_epoch": 2, "changed": {}}
    # Each stretch of epochs says where it ran, so a run trained on a GPU and finished elsewhere is told apart.
    assert [(s["first_epoch"], s["last_epoch"]) for s in metadata["training"]["trained_on"]] == [(1, 2), (3, 3)]
    assert {s["device"] for s in metadata["training"]["trained_on"]} == {metadata["training"]["device"]}
    assert all(s["hardware"] and s["torch"] for s in metadata["training"]["trained_on"])
    # A finished run's checkpoint trains no more: it is exported again, as it was.
    assert train("again", "--checkpoint", str(checkpoint)) == 0
    again = json.loads((tmp_path / "again" / "convnet-smoke" / "1" / "metrics.json").read_text())
    assert again["validation"] == straight["validation"]


def test_a_checkpoint_from_a_gpu_goes_on_and_exports_on_a_cpu(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "data", per_label=8)
    checkpoint = tmp_path / "run.ckpt"

    def train(*extra: str) -> int:
        return main(["train", "--data", str(tree), "--store", str(tmp_path / "store"), "--preset", "smoke",
                     "--epochs", "3", "--val-fraction", "0.25", "--no-progress", "--checkpoint", str(checkpoint),
                     *extra])

    real_save = training_loop.save_checkpoint

    def save_then_die(path, **state):
        real_save(path, **state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(training_loop, "save_checkpoint", real_save)
    # As a CUDA machine writes it: its generator's state is CUDA's (16 bytes), which a CPU generator cannot take.
    state = torch.load(checkpoint, weights_only=False)
    state["stretches"][-1].update(device="cuda", hardware="NVIDIA H200")
    state["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, checkpoint)
    assert train() == 0
    training = json.loads((tmp_path / "store" / "lenet-smoke" / "1" / "metadata.json").read_text())["training"]
    assert [(s["device"], s["first_epoch"], s["last_epoch"]) for s in training["trained_on"]] == [
        ("cuda", 1, 2), ("cpu", 3, 3)]
    assert training["trained_on"][0]["hardware"] == "NVIDIA H200" and training["device"] == "cuda, cpu"


def test_self_distillation_share_rises_over_the_focus_epochs():
    config = TrainConfig(epochs=10, focus_epochs=4, self_distill=0.6)
    shares = [self_distill_share(config, epoch) for epoch in range(1, 11)]
    assert shares[:6] == [0.0] * 6 and shares[-1] == pytest.approx(0.6)
    assert all(later > earlier for earlier, later in zip(shares[6:], shares[7:]))
    with pytest.raises(ValueError, match="--self-distill needs --ema-decay"):
        TrainConfig(self_distill=0.5, ema_decay=0.0)


class TracedBranch(LeNet):
    """A classic export pitfall: tracing records one branch of data-dependent Python control flow."""

    def forward_stages(self, x):
        stages = super().forward_stages(x)
        name, kind, logits = stages[-1]
        stages[-1] = (name, kind, logits * 3 if float(x.mean()) > 0 else logits)
        return stages


def test_parity_check_refuses_a_graph_that_differs_from_pytorch(tmp_path):
    inputs = np.abs(np.random.default_rng(0).normal(size=(8, 3, 32, 32))).astype(np.float32)
    write_graphs(Classifier(LeNet(4).eval(), tta_flip=False), tmp_path, inputs, properties={})  # agrees
    with pytest.raises(ParityError, match="differs from PyTorch"):
        write_graphs(Classifier(TracedBranch(4).eval(), tta_flip=False), tmp_path, inputs, properties={})


def test_check_parity_tolerance(tmp_path):
    inputs = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    model = LeNet(4).eval()
    write_graphs(Classifier(model, tta_flip=True, temperature=2.0), tmp_path, inputs, properties={})
    with torch.no_grad():
        logits = (model(torch.from_numpy(inputs)) + model(torch.from_numpy(inputs).flip(3))) / 2
    reference = {"probabilities": torch.softmax(logits / 2.0, dim=1).numpy(), "logits": logits.numpy()}
    assert check_parity(tmp_path / "model.onnx", reference, inputs)["max_abs_diff"] <= 1e-4
    reference["logits"] = reference["logits"] + 2e-4
    with pytest.raises(ParityError):
        check_parity(tmp_path / "model.onnx", reference, inputs)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "2", "--focus-epochs", "3"], "--focus-epochs must be between 0 and --epochs"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--cutmix", "2"], "--cutmix must be between 0 and 1"),
    (["--arch", "resnet"], "--arch must be 'convnet' or 'lenet'"),
    (["--residual", "2,4"], "--residual lists convnet blocks 1, 2 or 3"),
    (["--val-fraction", "0"], "--val-fraction must be between 0 and 1"),
])
def test_cli_refuses_bad_hyperparameters_before_reading_data(tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(tmp_path / "never-read"), "--store", str(tmp_path / "s"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and "Data root" not in error


def test_help_explains_the_command_line():
    result = subprocess.run([sys.executable, "-m", "training", "train", "--help"], capture_output=True, text=True,
                            check=True)
    for expected in ("--data", "--preset", "--epochs", "passes over the training images", "--label-smoothing"):
        assert expected in result.stdout
    top = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True, check=True)
    assert "cifar-10-batches-py" in top.stdout and "evaluate" in top.stdout
    assert "(default: None)" not in result.stdout  # each flag shows its real default once


def test_evaluate_command_measures_a_stored_model(tiny_run, capsys):
    store, tree = tiny_run
    assert main(["evaluate", str(store / "convnet-smoke" / "1"), "--data", str(tree)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 48 and 0 <= report["accuracy"] <= 1
    assert report["precision"] in ("int8", "fp32")


def test_only_the_default_and_lenet_presets_publish_under_the_served_names():
    from training.__main__ import model_name

    assert model_name("default", "convnet") == "convnet" and model_name("lenet", "lenet") == "lenet"
    assert model_name("gpu", "convnet") == "convnet"
    assert model_name("fast", "convnet") == "convnet-fast" and model_name("smoke", "lenet") == "lenet-smoke"


def test_a_run_logged_to_a_file_writes_one_line_per_epoch_and_no_bars(tmp_path):
    tree = write_tree(tmp_path / "data", per_label=8)
    result = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(tree), "--store",
                             str(tmp_path / "store"), "--preset", "smoke", "--epochs", "3", "--val-fraction", "0.25"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\r" not in output, "no carriage-return progress bars when nobody watches a terminal"
    assert [line.split()[1] for line in output.splitlines() if line.startswith("epoch")] == ["1", "2", "3"]
