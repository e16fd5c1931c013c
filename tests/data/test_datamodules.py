import lightning as L
import pytest
import torch

from lpl.data import MNIST5kDataModule, OrderedBatchSampler, SeededBatchSampler, TextCorpusDataModule
from lpl.data.base import IndexedDataModule
from lpl.data.imagefolder import ImageFolderDataModule
from lpl.utils.errors import LplError


@pytest.fixture(scope="module")
def mnist() -> MNIST5kDataModule:
    dm = MNIST5kDataModule(batch_size=32, val_size=1000, seed=3)
    dm.setup()
    return dm


def test_mnist_split_shapes_ids_and_balance(mnist: MNIST5kDataModule) -> None:
    assert len(mnist.train_set) == 4000 and len(mnist.val_set) == 1000
    batch = next(iter(mnist.train_dataloader()))
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (32,) and batch["index"].shape == (32,)
    # ids are stable positions: the sample at an id is the same whatever the shuffling
    first = int(batch["index"][0])
    assert torch.equal(mnist.train_set[first]["image"], batch["image"][0])
    # stratified validation split: 100 images of each digit
    assert torch.bincount(mnist.val_set.labels, minlength=10).tolist() == [100] * 10
    # in a shuffled order: the first validation batch already holds every digit (it held only 0s in id order)
    first_val = next(iter(mnist.val_dataloader()))["label"][:64]
    assert torch.unique(first_val).numel() == 10
    # train and validation come from disjoint rows of the 5,000
    assert not set(mnist.train_set.ids.tolist()) & set(mnist.val_set.ids.tolist())


def test_mnist_split_is_deterministic_given_seed() -> None:
    a, b, c = (MNIST5kDataModule(seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.ids, b.val_set.ids)
    assert not torch.equal(a.val_set.ids, c.val_set.ids)
    assert a.train_batches() == b.train_batches()


def test_explicit_order_replays_pool(mnist: MNIST5kDataModule) -> None:
    pool = mnist.train_batches()
    dm = MNIST5kDataModule(batch_size=32, seed=3, order=[5, 0, 5])
    dm.setup()
    seen = [batch["index"].tolist() for batch in dm.train_dataloader()]
    assert seen == [pool[5], pool[0], pool[5]]


def test_text_corpus_windows_are_shifted_pairs() -> None:
    dm = TextCorpusDataModule(seq_len=32, batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and batch["labels"].shape == (8, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["input_ids"].max()) < 256
    sample = dm.train_set[int(batch["index"][0])]
    assert torch.equal(sample["input_ids"], batch["input_ids"][0])
    # contiguous split: the validation text is the end of the corpus
    assert len(dm.val_set) > 0 and len(dm.train_set) > 9 * len(dm.val_set) * 0.9


def test_samplers_resume_mid_epoch() -> None:
    sampler = SeededBatchSampler(num_samples=20, batch_size=4, seed=0)
    full = list(sampler)  # epoch 0
    sampler = SeededBatchSampler(num_samples=20, batch_size=4, seed=0)
    iterator = iter(sampler)
    head = [next(iterator), next(iterator)]
    state = sampler.state_dict()
    resumed = SeededBatchSampler(num_samples=20, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert list(resumed) != full  # the next epoch is shuffled differently


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(LplError, match="order names batch 3"):
        OrderedBatchSampler([[0], [1]], order=[3])
    with pytest.raises(LplError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(LplError, match="not an ImageNet-style folder"):
        ImageFolderDataModule(root=str(tmp_path / "flat"))
    with pytest.raises(LplError, match="corpus"):
        TextCorpusDataModule(corpus=str(tmp_path / "nothing.txt"))
    with pytest.raises(LplError, match="val_size"):
        MNIST5kDataModule(val_size=0)


def test_imagefolder_reads_imagenet_layout(tmp_path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), color=(i * 40, 10, 200)).save(folder / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=4, num_workers=0, eval_batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    val = next(iter(dm.val_dataloader()))
    assert val["label"].tolist() == [0] * 4 + [1] * 4


def test_imagefolder_class_folders_without_images_or_differing_between_splits_are_refused(tmp_path) -> None:
    from PIL import Image

    for split, classes in (("train", ("cat", "dog", "owl")), ("val", ("cat", "owl"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    with pytest.raises(LplError, match=r"different classes \(e.g. 'dog' in one only\)"):  # one label, two classes
        ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(LplError, match=r"\['dog'\] .* hold no images"):
        ImageFolderDataModule(root=str(tmp_path))
    with pytest.raises(LplError, match="is a file, not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "train" / "cat" / "0.png"))


def test_epochs_stay_full_when_the_loader_stops_at_the_last_batch() -> None:
    # Lightning draws exactly len(sampler) batches per epoch and never exhausts the iterator.
    sampler = SeededBatchSampler(num_samples=20, batch_size=4, seed=0)
    epochs = []
    for _ in range(3):
        iterator = iter(sampler)
        epochs.append([next(iterator) for _ in range(len(sampler))])
    assert all(len(epoch) == 5 for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch reshuffled, none empty or repeated


def test_imagefolder_reads_16_bit_images_and_names_files_it_cannot_read(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from lpl.data.imagefolder import load_rgb

    grey = np.full((8, 8), 0.3 * 65535, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")  # 16-bit: PIL's convert("RGB") alone clips it to white
    Image.fromarray((grey // 257).astype(np.uint8)).save(tmp_path / "flat.png")
    assert np.abs(np.asarray(load_rgb(str(tmp_path / "deep.png")), dtype=int)
                  - np.asarray(load_rgb(str(tmp_path / "flat.png")), dtype=int)).max() <= 1
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(LplError, match="cannot read image .*text.jpg"):
        load_rgb(str(tmp_path / "text.jpg"))


def test_imagefolder_layout_counts_what_torchvision_reads(tmp_path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "shared" / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "shared" / split / "0.ppm")  # a suffix torchvision reads
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "linked").symlink_to(tmp_path / "shared" / split)  # followed, as torchvision does
    ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "train" / "dog" / "fake.jpg").mkdir(parents=True)  # a folder named like an image is no image
    (tmp_path / "val" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "dog" / "0.png")
    with pytest.raises(LplError, match=r"\['dog'\] .* hold no images"):
        ImageFolderDataModule(root=str(tmp_path))


def test_text_corpus_and_sampler_arguments_out_of_range_are_refused(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LplError, match="is empty"):
        dm = TextCorpusDataModule(corpus=str(tmp_path / "empty.txt"))
        dm.setup("fit")
    with pytest.raises(LplError, match="max_train_samples must be at least 1"):
        TextCorpusDataModule(max_train_samples=-1)
    with pytest.raises(LplError, match="use_distributed_sampler=False"):  # as Lightning rebuilds it under DDP
        SeededBatchSampler(torch.utils.data.DistributedSampler(range(8), num_replicas=2, rank=0), batch_size=2)


def test_a_checkpoint_taken_while_fit_validates_saves_the_batches_trained_not_those_prefetched() -> None:
    """ModelCheckpoint saves when a mid-epoch validation ends (trainer.training is False then): the position must
    still be the batches trained, not the sampler's count, which workers ran ahead of training."""
    from types import SimpleNamespace

    from lpl.data.base import ResumableDataLoader

    sampler = SeededBatchSampler(num_samples=64, batch_size=8)
    loader = ResumableDataLoader(range(64), batch_sampler=sampler)
    batches = iter(sampler)
    for _ in range(7):  # prefetched by workers
        next(batches)
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    loader.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), training=False, current_epoch=0,
                                     num_training_batches=8,
                                     fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    assert loader.state_dict() == {"epoch": 0, "consumed": 3, "plan": loader.batch_sampler.plan_digest(0, 3)}


def test_sampler_ids_and_saved_positions_out_of_range_are_refused() -> None:
    for order in ([0, 1.7], [0, -1], [True, 0]):
        with pytest.raises(LplError, match="whole numbers from 0"):
            OrderedBatchSampler([[0, 1], [2, 3]], order=order)
    with pytest.raises(LplError, match="whole numbers from 0"):
        OrderedBatchSampler([[0, -3]])
    sampler = OrderedBatchSampler([[0, 1], [2, 3]])
    with pytest.raises(LplError, match="another dataset or batch size"):
        sampler.load_state_dict({"epoch": 0, "consumed": 5})
    sampler.load_state_dict({"epoch": 0, "consumed": 1})
    assert list(sampler) == [[2, 3]]


def test_a_datamodule_refuses_flat_batches_and_reads_array_orders() -> None:
    data = _TinyData()
    data.batches = [0, 1, 2]
    with pytest.raises(LplError, match="each a list of sample ids"):
        data.train_batch_sampler()
    data.batches, data.order = torch.arange(16).reshape(4, 4), torch.tensor([3, 1])
    assert list(data.train_batch_sampler()) == [[12, 13, 14, 15], [4, 5, 6, 7]]
    data.batches, data.order = [[0, 16]], None
    with pytest.raises(LplError, match="sample id 16"):
        data.train_batch_sampler()


class _Indexed(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "x": torch.full((2,), float(i))}


class _TinyData(IndexedDataModule):
    def __init__(self) -> None:
        super().__init__(batch_size=4, seed=0, batches=None, order=None, eval_batch_size=4)

    def build_datasets(self):
        return _Indexed(), _Indexed()


class _SeesBatches(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.layer(batch["x"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_one_device_fit_trains_whole_batches_under_a_leftover_process_group(monkeypatch) -> None:
    """A script's one-device Trainer after a DDP fit: torch.distributed still reports the DDP fit's 2 processes."""
    from lpl.data import samplers

    monkeypatch.setattr(samplers, "rank_and_world", lambda: (1, 2))
    model = _SeesBatches()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=_TinyData())
    assert model.seen == _TinyData().train_batches()[:2]


def test_hyperparameters_sharing_a_name_with_the_models_are_logged_apart(tmp_path) -> None:
    """A model built for any image size (img_size=None) on 28x28 data: Lightning refused to merge the two img_size
    hyperparameters and stopped every fit with a logger; the data's go under data/ instead."""
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    class AnySize(L.LightningModule):
        def __init__(self, img_size: int | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.head = torch.nn.Linear(28 * 28, 10)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.head(batch["image"].flatten(1)), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(max_steps=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(AnySize(), datamodule=MNIST5kDataModule(batch_size=16, val_size=100))
    logged = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert logged["img_size"] is None and logged["data/img_size"] == 28 and logged["data/batch_size"] == 16
