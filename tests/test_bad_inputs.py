"""A battery of bad command-line overrides: each fails before anything trains, with a
`ConfigError` naming the key and what it found.

Every case composes the real configs in-process, validates them and runs the checks the
entry point runs before the recipe (building the datasets, `check_before_training`, the
encoder configs); nothing trains. Datasets are built once per data config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from experiments.builders import (
    build_datasets,
    check_before_training,
    compose_config,
    encoder_configs,
    model_spec,
)
from experiments.schema import ConfigError

MANIFEST = "data=manifest data.path={manifest}"
IMAGES = "data=manifest data.path={images} data.target=label"  # 8x8 RGB PNGs

# (overrides, the key the error must name, what it must say it found)
CASES = [
    # trainer: ranges, types, relations
    ("trainer.fuse.lr=-1", "trainer.fuse.lr", "-1.0"),
    ("trainer.pretrain.lr=0", "trainer.pretrain.lr", "0.0"),
    ("trainer.fuse.lr=inf", "trainer.fuse.lr", "inf"),
    ("trainer.fuse.lr=fast", "trainer.fuse.lr", "'fast'"),
    ("trainer.fuse.weight_decay=-0.1", "trainer.fuse.weight_decay", "-0.1"),
    ("trainer.pretrain.weight_decay=nan", "trainer.pretrain.weight_decay", "nan"),
    ("trainer.fuse.epochs=0", "trainer.fuse.epochs", "0"),
    ("trainer.pretrain.epochs=-3", "trainer.pretrain.epochs", "-3"),
    ("trainer.batch_size=0", "trainer.batch_size", "0"),
    ("trainer.batch_size=-8", "trainer.batch_size", "-8"),
    ("trainer.batch_size=abc", "trainer.batch_size", "'abc'"),
    ("trainer.batch_size=1.5", "trainer.batch_size", "'1.5'"),
    ("trainer.batch_size=[1,2]", "trainer.batch_size", "[1, 2]"),
    ("trainer.stop_after_epochs=0", "trainer.stop_after_epochs", "0"),
    ("trainer.stop_after_epochs=-1", "trainer.stop_after_epochs", "-1"),
    ("trainer.device=tpu", "trainer.device", "'tpu'"),
    ("trainer.device=gpu", "trainer.device", "'gpu'"),
    ("trainer.device=gpu:1", "trainer.device", "'gpu:1'"),
    ("trainer.device=cuda:x", "trainer.device", "'cuda:x'"),
    ("trainer.device=''", "trainer.device", "''"),
    ("trainer.precision=16", "trainer.precision", "'16'"),
    ("trainer.strategy=fsdp", "trainer.strategy", "'fsdp'"),
    ("trainer.num_workers=-1", "trainer.num_workers", "-1"),
    ("trainer.prefetch_factor=0", "trainer.prefetch_factor", "0"),
    ("trainer.persistent_workers=true", "trainer.persistent_workers", "num_workers=null gives"),
    ("trainer.fuse.views=0", "trainer.fuse.views", "0"),
    ("trainer.fuse.accumulate=0", "trainer.fuse.accumulate", "got 0"),
    (
        "trainer.fuse.optimizer={_target_:torch.optim.SDG}",
        "trainer.fuse.optimizer._target_",
        "did you mean ['torch.optim.SGD'",
    ),
    (
        "trainer.fuse.optimizer={_target_:torch.optim.SGD,momentun:0.9}",
        "trainer.fuse.optimizer.momentun",
        "did you mean ['momentum']",
    ),
    (
        "trainer.pretrain.scheduler={_target_:torch.optim.lr_scheduler.StepLR,step:2}",
        "trainer.pretrain.scheduler.step",
        "takes no such argument",
    ),
    (
        "trainer.fuse.optimizer={_target_:torch.optim.Rprop}",
        "trainer.fuse.weight_decay",
        "takes no weight decay",
    ),
    ("trainer.fuse.warmup_epochs=10", "trainer.fuse.warmup_epochs", "got 10"),
    ("trainer.pretrain.clip_grad_norm=-1", "trainer.pretrain.clip_grad_norm", "got -1.0"),
    ("trainer.fuse.clip_grad_norm=inf", "trainer.fuse.clip_grad_norm", "got inf"),
    ("trainer.fuse.early_stopping={patience:0}", "trainer.fuse.early_stopping.patience", "got 0"),
    (
        "trainer.fuse.early_stopping={min_delta:-0.1}",
        "trainer.fuse.early_stopping.min_delta",
        "got -0.1",
    ),
    (
        "trainer.fuse.early_stopping={patiense:3}",
        "trainer.fuse.early_stopping.patiense",
        "Key 'patiense' not in 'EarlyStoppingConfig'; did you mean ['patience']?",
    ),
    ("trainer.fuse.layer_decay=1.5", "trainer.fuse.layer_decay", "1.5"),
    ("trainer.pretrain.layer_decay=0", "trainer.pretrain.layer_decay", "0.0"),
    ("trainer.fuse.lr_mult={backbone:-1}", "trainer.fuse.lr_mult.backbone", "-1.0"),
    ("trainer.fuse.weight_decay_for={post:-0.5}", "trainer.fuse.weight_decay_for.post", "-0.5"),
    ("trainer.fuse.unfreeze={start_epoch:0}", "trainer.fuse.unfreeze.start_epoch", "0"),
    ("trainer.fuse.unfreeze={every:0}", "trainer.fuse.unfreeze.every", "0"),
    ("trainer.resume=''", "trainer.resume", "''"),
    ("trainer.feature_cache.dtype=bf16", "trainer.feature_cache.dtype", "'bf16'"),
    ("+trainer.epochz=3", "trainer.epochz", "epochz"),
    ("trainer.fuse.epochz=3", "trainer.fuse.epochz", "['epochs']"),
    # logger, seeds, output folders
    ("logger.mode=cloud", "logger.mode", "'cloud'"),
    ("logger.watch=weights", "logger.watch", "'weights'"),
    ("logger.log_every_n_steps=0", "logger.log_every_n_steps", "0"),
    ("logger.mod=offline", "logger.mod", "['mode']"),
    ("seed=-1", "seed", "-1"),
    ("seed=4294967296", "seed", "4294967296"),
    ("seed=abc", "seed", "'abc'"),
    ("seed=[0,1]", "seed", "[0, 1]"),
    ("data.seed=-1", "data.seed", "-1"),
    ("data.seed=1.5", "data.seed", "1.5"),
    ("paths.output_dir=''", "paths.output_dir", "''"),
    ("paths.output_dir=null", "paths.output_dir", "None"),
    ("paths.pretrained_dir={file}", "paths.pretrained_dir", "a file at {file}"),
    ("paths.feature_cache_dir={file}/cache", "paths.feature_cache_dir", "{file}/cache"),
    # the model: components, modality names, tasks and conditions, class counts
    ("model.fusion=null", "model.fusion", "None"),
    ("model.head=null", "model.head", "None"),
    ("model.modality_dropout={image:1.0}", "model.modality_dropout.image", "1.0"),
    ("model.modality_dropout={image:-0.1}", "model.modality_dropout.image", "-0.1"),
    ("model.modality_dropout={imgae:0.3}", "model.modality_dropout.imgae", "['image']"),
    ("model.modality_dropout=0.3", "model.modality_dropout", "float"),
    ("+model.num_classes=0", "model.num_classes", "num_classes"),
    ("+model.head.num_classes=0", "model.head.num_classes", "got 0"),
    ("+model.head.in_dim=7", "model.head.in_dim", "got 7"),
    ("model/fusion=late +model.fusion.num_classes=3", "model.fusion.num_classes", "got 3"),
    ("data.task=which", "model.head", "ClassificationHead"),
    ("data.task=which model/head=moe", "model.head", "MixtureOfExpertsHead"),
    ("data.task=which model/fusion=late model/head=conditional", "model.head", "LateFusion"),
    ("model/head=conditional", "model.head", "data.task=digit"),
    (
        "data.task=which model/head=conditional model.head.num_conditions=3",
        "model.head.num_conditions",
        "got 3",
    ),
    (
        "data.task=multitask",
        "model.head",
        "data.task=multitask has 3 tasks (written, spoken, same); the mlp head "
        "(fusion.heads.ClassificationHead) predicts one; use model/head=multitask",
    ),
    ("data.task=multitask model/head=moe", "model.head", "the moe head"),
    ("data.task=multitask model/head=conditional", "model.head", "(model/head=multitask)"),
    ("data.task=same model/head=multitask", "model.head", "got 2"),
    ("data.task=multitask model/fusion=late model/head=multitask", "model.fusion", "several"),
    ("model.head.dropout=1.5", "model.head.dropout", "1.5"),
    ("model.head.hidden=[-1]", "model.head", "-1"),
    ("model.head.hidden=64", "model.head.hidden", "64"),
    ("model.head.activation=relux", "model.head.activation", "'relux'"),
    ("+model.head.hiden=[64]", "model.head.hiden", "['hidden']"),
    ("model.fusion.dim=0", "model.fusion.dim", "0"),
    ("model.fusion.dim=abc", "model.fusion.dim", "'abc'"),
    ("model.fusion.dropout=2", "model.fusion.dropout", "2"),
    ("+model.encoders.imag.freeze=true", "model.encoders.imag", "['image']"),
    ("+model.encoders.image.freez=backbone", "model.encoders.image.freez", "['freeze']"),
    ("+model.encoders.image.in_channels=abc", "model.encoders.image.in_channels", "'abc'"),
    ("model.auto_encoders.image=resnet19", "model.auto_encoders.image", "'resnet19'"),
    # data: typos, types, ranges, files
    ("data.augmnt=true", "data.augmnt", "['augment']"),
    ("+data.augmnt=true", "data.augmnt", "['augment']"),
    ("data.augment=maybe", "data.augment", "'maybe'"),
    ("data.task=whic", "data.task", "whic"),
    # optimizer and scheduler values torch refuses, and rates a schedule drives below zero
    (
        "trainer.fuse.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true}",
        "trainer.fuse.scheduler",
        "missing 1 required positional argument: 'step_size'",
    ),
    (
        "trainer.fuse.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:abc}",
        "trainer.fuse.scheduler",
        "fails stepping after epoch 1",
    ),
    (
        "trainer.fuse.epochs=3 trainer.fuse.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:-2}",
        "trainer.fuse.scheduler",
        "gives the learning rate -0.002 at epoch 2 of 3",
    ),
    (
        "trainer.pretrain.optimizer={_target_:torch.optim.Adam,_partial_:true,betas:[0.9]}",
        "trainer.pretrain.optimizer",
        "cannot be built",
    ),
    (
        "trainer.fuse.optimizer={_target_:torch.optim.SGD,_partial_:true,momentum:-0.5}",
        "trainer.fuse.optimizer",
        "Invalid momentum value: -0.5",
    ),
    (
        "trainer.fuse.optimizer={_target_:torch.optim.Adam,_partial_:true,eps:-1.0}",
        "trainer.fuse.optimizer",
        "Invalid epsilon value: -1.0",
    ),
    # the alignment stage
    ("trainer.align={pairs:[[image,text]]}", "trainer.align.pairs[0]", "no modality 'text'"),
    ("trainer.align={pairs:[[image,image]]}", "trainer.align.pairs[0]", "got [image, image]"),
    ("trainer.align={pairs:[]}", "trainer.align.pairs", "at least one pair"),
    ("trainer.align={pairs:[image,audio]}", "trainer.align.pairs", "str is not a ListConfig"),
    (
        "trainer.align={pairs:[[image,audio]],epoch:3}",
        "trainer.align.epoch",
        "did you mean ['epochs']",
    ),
    ("trainer.align={pairs:[[image,audio]],temperature:0}", "trainer.align.temperature", "got 0.0"),
    # auxiliary losses in stage 2
    ("trainer.fuse.auxiliary={unimodal:0.5}", "trainer.fuse.auxiliary", "unfreeze is null"),
    (
        "trainer.fuse.auxiliary={unimodal:-1} trainer.fuse.unfreeze={start_epoch:1}",
        "trainer.fuse.auxiliary.unimodal",
        "got -1.0",
    ),
    (
        "trainer.fuse.auxiliary={} trainer.fuse.unfreeze={}",
        "trainer.fuse.auxiliary",
        "every weight is 0",
    ),
    (
        "trainer.fuse.auxiliary={contrastive:0.1} trainer.fuse.unfreeze={}",
        "trainer.fuse.auxiliary.pairs",
        "expected pairs of modalities",
    ),
    (
        "trainer.fuse.auxiliary={contrastive:0.1,pairs:[[image,text]]} trainer.fuse.unfreeze={}",
        "trainer.fuse.auxiliary.pairs[0]",
        "no modality 'text'",
    ),
    (
        "trainer.fuse.auxiliary={unimodal:1,unimodl:2} trainer.fuse.unfreeze={}",
        "trainer.fuse.auxiliary.unimodl",
        "did you mean ['unimodal']",
    ),
    # modality imbalance: OGM-GE and Gradient-Blending
    ("trainer.fuse.ogm_ge={alpha:0.5}", "trainer.fuse.ogm_ge", "unfreeze is null"),
    (
        "trainer.fuse.ogm_ge={alpha:0} trainer.fuse.unfreeze={}",
        "trainer.fuse.ogm_ge.alpha",
        "got 0.0",
    ),
    (
        "trainer.fuse.ogm_ge={start_epoch:20} trainer.fuse.unfreeze={}",
        "trainer.fuse.ogm_ge.start_epoch",
        "expected 1 to 10",
    ),
    (
        "data.task=sum trainer.fuse.ogm_ge={} trainer.fuse.unfreeze={}",
        "trainer.fuse.ogm_ge",
        "one classification task (multiclass or binary), got {'sum': 'regression'}",
    ),
    ("trainer.fuse.gradient_blending={}", "trainer.fuse.gradient_blending", "unfreeze is null"),
    (
        "trainer.fuse.gradient_blending={every:5} trainer.fuse.unfreeze={}",
        "trainer.fuse.gradient_blending.every",
        "lower every (at most 4)",
    ),
    (
        "trainer.fuse.ogm_ge={} trainer.fuse.unfreeze={start_epoch:3}",
        "trainer.fuse.ogm_ge.start_epoch",
        "trainer.fuse.ogm_ge.start_epoch=3",
    ),
    (
        "trainer.fuse.ogm_ge=true",
        "trainer.fuse.ogm_ge",
        "bool is not a subclass of OGMGEConfig. value: True; it takes a mapping of its settings "
        "(alpha, noise, start_epoch, end_epoch): 'trainer.fuse.ogm_ge={}' for the defaults",
    ),
    (
        "trainer.fuse.gradient_blending={} trainer.fuse.unfreeze={} trainer.fuse.epochs=2",
        "trainer.fuse.gradient_blending.every",
        "the stage has 2 epochs: raise trainer.fuse.epochs to 3 or more (every: 1)",
    ),
    (  # the thaw that never comes is named, not OGM-GE starting before it
        "trainer.fuse.ogm_ge={} trainer.fuse.unfreeze={start_epoch:12}",
        "trainer.fuse.unfreeze.start_epoch",
        "the encoders would never thaw, got 12",
    ),
    (
        "trainer.fuse.unfreeze={start_epoch:12}",
        "trainer.fuse.unfreeze.start_epoch",
        "the encoders would never thaw, got 12",
    ),
    (
        "trainer.fuse.gradient_blending={every:0} trainer.fuse.unfreeze={}",
        "trainer.fuse.gradient_blending.every",
        "got 0",
    ),
    (
        "trainer.fuse.gradient_blending={} trainer.fuse.auxiliary={unimodal:0.5} trainer.fuse.unfreeze={}",
        "trainer.fuse.auxiliary.unimodal",
        "Gradient-Blending estimates",
    ),
    # per-task losses and metrics
    (
        "data.task=sum +tasks.sum.label_smoothing=0.1",
        "tasks.sum.label_smoothing",
        "regression task trains with mse",
    ),
    ("+tasks.digt.loss=mse", "tasks.digt", "did you mean ['digit']"),
    ("+tasks.digit.loss=mse", "tasks.digit.loss", "got 'mse'"),
    ("+tasks.digit.metrics=[mae]", "tasks.digit.metrics", "got 'mae'"),
    ("+tasks.digit.class_weights=[1,2]", "tasks.digit.class_weights", "got 2: [1.0, 2.0]"),
    ("data.task=digits +tasks.digits.pos_weight=-1", "tasks.digits.pos_weight", "got -1"),
    ("data.max_samples=0", "data.max_samples", "0"),
    ("data.max_samples=-5", "data.max_samples", "-5"),
    ("data.fractions=0.5", "data.fractions", "0.5"),
    ("data.fractions=[0.5,0.5]", "data.fractions", "[0.5, 0.5]"),
    ("data.clip_seconds=abc", "data.clip_seconds", "'abc'"),
    ("data.clip_seconds=0.1", "data.clip_seconds", "0.1"),
    ("data.image_noise_std=-1", "data.image_noise_std", "-1"),
    ("data.image_noise_std=[1]", "data.image_noise_std", "[1]"),
    ("data.occlusion=[0.5,0.1]", "data.occlusion", "[0.5, 0.1]"),
    ("data.audio_snr_db=[-100,0]", "data.audio_snr_db", "[-100, 0]"),
    ("data.same_prob=1.5", "data.same_prob", "1.5"),
    ("data.text_accuracy=2", "data.text_accuracy", "2"),
    ("data.speech_path={missing}", "data.speech_path", "nothing at {missing}"),
    ("data.speech_path={dir}", "data.speech_path", "a folder at {dir}"),
    ("data.speech_path=''", "data.speech_path", "an empty string"),
    (f"{MANIFEST} data.target=lable", "data.target", "'lable'"),
    (MANIFEST, "data.target", "needs it"),
    (f"{MANIFEST} data.target=label data.columns={{x:imag}}", "data.columns", "'imag'"),
    (f"{MANIFEST} data.target=label data.audio_crop=middle", "data.audio_crop", "'middle'"),
    (
        f"{MANIFEST} data.target=label data.audio_sample_rate=fast",
        "data.audio_sample_rate",
        "'fast'",
    ),
    ("data=manifest data.path={missing} data.target=label", "data.path", "nothing at {missing}"),
    ("data=manifest data.path={dir} data.target=label", "data.path", "a folder at {dir}"),
    (
        f"{MANIFEST} data.target=label data.augment=[{{_target_:torchvision.transforms.v2.RandomFlipp}}]",
        "data.augment[0]._target_",
        "cannot import 'torchvision.transforms.v2.RandomFlipp'; did you mean",
    ),
    (
        f"{MANIFEST} data.target=label data.augment=[{{_target_:torchvision.transforms.v2.RandomCrop,sizee:3}}]",
        "data.augment[0]",
        "unexpected keyword argument 'sizee'",
    ),
    (
        f"{MANIFEST} data.target=x",
        "data.target",
        "to predict the number, set data.target_kind=regression",
    ),
    (
        "data=manifest data.path={bad_test} data.target=label",
        "data",
        "(data.manifest.ManifestDataset, split 'test'): {bad_test}, data row 20, column 'photo': "
        "cannot decode",
    ),
    (
        f"{IMAGES} data.augment=[{{_target_:torchvision.transforms.v2.RandomCrop,size:16}}]",
        "data.augment[0]",
        "RandomCrop(size=16) fails on the train split's first 'photo' image, of shape [3, 8, 8]: "
        "Required crop size (16, 16) is larger than input image size (8, 8)",
    ),
    (
        f"{IMAGES} data.augment=[{{_target_:torchvision.transforms.v2.RandomHorizontalFlip}},"
        "{_target_:torchvision.transforms.v2.RandomCrop,size:16,padding:1}]",
        "data.augment[1]",
        "RandomCrop(size=16, padding=1) fails on the train split's first 'photo' image",
    ),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """A small manifest (a numeric and a categorical column), a plain file standing where a
    folder belongs, a folder where a file belongs, a path with nothing there, an output folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    rows = [f"{i}.5,c{i % 3},l{i % 2},{'train' if i < 16 else 'val' if i < 20 else 'test'}"
            for i in range(24)]  # fmt: skip
    (root / "manifest.csv").write_text("\n".join(["x,c,label,split", *rows]) + "\n")
    (root / "file").write_text("not a folder")
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(root / f"{i}.png")
    rows = [f"{i}.png,l{i % 2},{'train' if i < 12 else 'val' if i < 16 else 'test'}"
            for i in range(20)]  # fmt: skip
    (root / "images.csv").write_text("\n".join(["photo,label,split", *rows]) + "\n")
    (root / "garbage.png").write_bytes(b"not an image")  # in the test split's last row
    rows[-1] = rows[-1].replace("19.png", "garbage.png")
    (root / "bad_test.csv").write_text("\n".join(["photo,label,split", *rows]) + "\n")
    (root / "dir").mkdir()
    return {
        "manifest": str(root / "manifest.csv"),
        "images": str(root / "images.csv"),
        "bad_test": str(root / "bad_test.csv"),
        "file": str(root / "file"),
        "dir": str(root / "dir"),
        "missing": str(root / "missing.npz"),
        "out": str(root / "outputs"),
    }


BUILT: dict[str, dict] = {}


def datasets_for(data) -> dict:
    """The datasets of one data config, built once for the whole module."""
    key = OmegaConf.to_yaml(data)
    if key not in BUILT:
        BUILT[key] = build_datasets(data)
    return BUILT[key]


def fill(text: str, places: dict[str, str]) -> str:
    """`text` with each `{place}` replaced by the fixture's path."""
    for name, path in places.items():
        text = text.replace(f"{{{name}}}", path)
    return text


def prepare(*overrides: str) -> None:
    """What the entry point does with a config before the recipe runs."""
    cfg = compose_config(*overrides)
    datasets = datasets_for(cfg.data)
    check_before_training(cfg, datasets)
    encoder_configs(cfg.model, datasets["train"].modalities)


def test_the_battery_starts_from_configs_that_pass(places):
    """The checks refuse the cases below for what they change, not for the setup."""
    prepare(f"paths.output_dir={places['out']}")
    prepare(f"paths.output_dir={places['out']}", *fill(MANIFEST, places).split(),
            "data.target=label")  # fmt: skip


@pytest.mark.parametrize(("overrides", "key", "found"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_before_training(places, overrides, key, found):
    with pytest.raises(ConfigError) as caught:
        prepare(f"paths.output_dir={places['out']}", *fill(overrides, places).split())
    message = str(caught.value)
    assert message.startswith(f"config key '{key}'"), message
    assert fill(found, places) in message, message


def test_a_folder_probe_leaves_nothing_behind(places):
    out = Path(places["out"])
    prepare(f"paths.output_dir={out}")
    assert sorted(p.name for p in out.iterdir()) == ["features", "pretrained"]
    assert not any((out / "pretrained").iterdir())


ENCODER_CASES = [
    ("+model.encoders.image.freeze=backbon", "model.encoders.image.freeze", "got 'backbon'"),
    ("+model.encoders.image.weights=IMAGENET1K_V9", "model.encoders.image.weights", "'IMAGENET1K_V9'"),
    ("+model.encoders.audio.n_mels=0", "model.encoders.audio.n_mels", "0"),
    ("+model.encoders.audio.clip_samples=100", "model.encoders.audio.clip_samples", "shorter than one analysis window (n_fft=256)"),
    ("+model.encoders.image.post=[{type:pool}]", "model.encoders.image.post", "post[0] (pool): expected a feature map [C, H, W], found [512]"),
    ("+model.encoders.image.std=[0.0]", "model.encoders.image.std", "std: expected values > 0, found [0.0]"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "key", "found"), ENCODER_CASES)
def test_an_encoder_setting_its_builder_refuses_is_named(places, override, key, found):
    """The recipe builds every encoder before stage 1 (`Recipe.check_encoders`) through
    these builders, so a refused setting stops the run there, naming its key."""
    cfg = compose_config(f"paths.output_dir={places['out']}", override)
    datasets = datasets_for(cfg.data)
    spec = model_spec(cfg.model, encoder_configs(cfg.model, datasets["train"].modalities))
    modality = key.split(".")[2]
    with pytest.raises(ConfigError) as caught:
        spec.encoders[modality]()
    message = str(caught.value)
    assert message.startswith(f"config key '{key}'"), message
    assert found in message, message


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    """A manifest of 1 s clips (16 kHz), 12 train, 4 val, 4 test."""
    import numpy as np
    import soundfile

    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(20):
        tone = np.sin(np.arange(16000) * (0.01 + 0.002 * (i % 2))).astype(np.float32) * 0.5
        soundfile.write(root / f"{i}.wav", tone, 16000)
        rows.append(f"{i}.wav,l{i % 2},{'train' if i < 12 else 'val' if i < 16 else 'test'}")
    (root / "manifest.csv").write_text("\n".join(["sound,label,split", *rows]) + "\n")
    return str(root / "manifest.csv")


def test_clips_padded_beyond_any_memory_are_refused_before_stage_1(places, clips):
    """600 s at 44.1 kHz on 1 s clips: a batch no machine holds while training, which the
    kernel would kill silently during stage 1."""
    with pytest.raises(ConfigError) as caught:
        prepare(f"paths.output_dir={places['out']}", "data=manifest", f"data.path={clips}",
                "data.target=label", "data.audio_sample_rate=44100", "data.audio_seconds=60000",
                "trainer.batch_size=16")  # fmt: skip
    message = str(caught.value)
    assert message.startswith(
        "config key 'data.audio_seconds': every 'sound' clip is padded to 60000 s, "
        "2,646,000,000 samples at 44100 Hz, so a batch of 16 clips (trainer.batch_size) "
        "takes 169.34 GB before the model's activations"
    ), message
    assert "the longest train clip lasts 1.00 s: set data.audio_seconds" in message, message


def test_clips_padded_far_beyond_the_longest_are_said(places, clips, caplog):
    cfg = compose_config(f"paths.output_dir={places['out']}", "data=manifest",
                         f"data.path={clips}", "data.target=label", "data.audio_seconds=5")  # fmt: skip
    datasets = datasets_for(cfg.data)
    with caplog.at_level("WARNING", logger="fusion"):
        check_before_training(cfg, datasets)
    assert (
        "data.audio_seconds=5 pads every 'sound' clip to 5 times the longest train clip "
        "(1.00 s): the padding is only zeros" in caplog.text
    ), caplog.text
    caplog.clear()
    cfg = compose_config(f"paths.output_dir={places['out']}", "data=manifest",
                         f"data.path={clips}", "data.target=label")  # fmt: skip
    with caplog.at_level("WARNING", logger="fusion"):
        check_before_training(cfg, datasets_for(cfg.data))
    assert "padding" not in caplog.text
