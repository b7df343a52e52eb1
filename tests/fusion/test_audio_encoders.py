from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchaudio
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchaudio.models import wav2vec2_model

from fusion.encoders import LogMelSpectrogram, build_spectrogram_encoder
from fusion.encoders.audio import FramePooling, MFCCFeatures, build_ssl_speech_encoder
from fusion.weights import IncompleteLoadError, WeightsUnavailableError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
AUDIO_DIR = CONFIGS / "model" / "encoder" / "audio"
AUDIO_CONFIGS = sorted(AUDIO_DIR.glob("*.yaml"))
WAV2VEC2_FILE = "wav2vec2_fairseq_base_ls960.pth"
CLIP_16K = 4000  # 0.25 s at the bundle's 16 kHz: 12 frames
SLOW = pytest.mark.slow  # builds all 12 layers of wav2vec2 base


def _no_network(*args, **kwargs):
    raise URLError("network disabled in tests")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may download: a missing cached file must take the offline path."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)


@pytest.fixture(scope="module")
def cached_wav2vec2(tmp_path_factory):
    """A random full WAV2VEC2_BASE saved where torchaudio looks for the bundle's weights."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(0)
    reference = wav2vec2_model(**torchaudio.pipelines.WAV2VEC2_BASE._params).eval()
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / WAV2VEC2_FILE)
    return torch_home, reference


@pytest.fixture
def reference(cached_wav2vec2, monkeypatch):
    torch_home, model = cached_wav2vec2
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return model


@pytest.mark.parametrize(
    ("front_end", "kind", "height"), [("logmel", LogMelSpectrogram, 32), ("mfcc", MFCCFeatures, 20)]
)
def test_spectrogram_front_end_shapes(front_end, kind, height):
    enc = build_spectrogram_encoder(
        front_end=front_end, clip_samples=2000, hop_length=160, n_mels=32, n_mfcc=20
    )
    # no resampler in front: checkpoints saved before resampling existed keep their keys
    assert isinstance(enc.preprocess, kind)
    wave = torch.randn(2, 2000)
    assert enc.preprocess(wave).shape == (2, 1, height, 13)
    assert enc(wave).shape == (2, 512)


def test_mfcc_is_level_invariant():
    front = MFCCFeatures()
    wave = torch.randn(1, 8000)
    assert torch.allclose(front(wave), front(10 * wave), atol=1e-3)


def test_spectrogram_encoder_takes_any_torchvision_cnn():
    enc = build_spectrogram_encoder("mobilenet_v3_small", front_end="mfcc", clip_samples=2000)
    assert enc.backbone.features[0][0].in_channels == 1
    assert enc(torch.randn(2, 2000)).shape == (2, enc.out_dim)


def test_spectrogram_encoder_resamples_input():
    enc = build_spectrogram_encoder(input_sample_rate=16000, clip_samples=4000, hop_length=160)
    wave = torch.randn(2, 4000)
    expected = LogMelSpectrogram(8000, 256, 160)(torchaudio.functional.resample(wave, 16000, 8000))
    assert torch.allclose(enc.preprocess(wave), expected, atol=1e-4)
    assert enc(wave).shape == (2, 512)


def test_spectrogram_encoder_rejects_unknown_front_end():
    with pytest.raises(ValueError, match="logmel"):
        build_spectrogram_encoder(front_end="cqt")


def test_frame_pooling_modes():
    frames = torch.randn(2, 5, 3)
    assert torch.equal(FramePooling("mean")(frames), frames.mean(1))
    assert torch.equal(FramePooling("max")(frames), frames.max(1).values)
    assert torch.equal(FramePooling("first")(frames), frames[:, 0])
    assert torch.equal(FramePooling("none")(frames), frames)


@pytest.mark.parametrize(
    ("pooling", "out_shape"),
    [("mean", (768,)), ("max", (768,)), ("first", (768,)), ("none", (12, 768))],
)
def test_ssl_encoder_shapes(pooling, out_shape):
    enc = build_ssl_speech_encoder(
        pretrained=False, layer=0, pooling=pooling, clip_samples=CLIP_16K
    )
    assert enc.out_shape == out_shape and enc.out_dim == 768
    assert enc(torch.randn(2, CLIP_16K)).shape == (2, *out_shape)


def test_ssl_encoder_builds_only_the_layers_it_reads():
    enc = build_ssl_speech_encoder(pretrained=False, layer=2, clip_samples=CLIP_16K)
    assert len(enc.backbone.model.encoder.transformer.layers) == 3


def test_ssl_encoder_wavlm():
    enc = build_ssl_speech_encoder("WAVLM_BASE", pretrained=False, layer=0, clip_samples=CLIP_16K)
    assert enc.out_shape == (768,)


@pytest.mark.parametrize("layer", [0, pytest.param(5, marks=SLOW), pytest.param(None, marks=SLOW)])
def test_ssl_pretrained_reproduces_the_cached_model(reference, layer):
    """Weights load from torchaudio's cache and the chosen layer is the one read out."""
    enc = build_ssl_speech_encoder(pooling="none", layer=layer, clip_samples=CLIP_16K).eval()
    wave = torch.randn(2, CLIP_16K)
    with torch.no_grad():
        frames = reference.extract_features(wave)[0]
        assert torch.equal(enc(wave), frames[-1 if layer is None else layer])


def test_ssl_layer_choice_changes_the_output(reference):
    """Layer -11 of 12 is layer 1: its mean-pooled frames, not layer 0's."""
    enc = build_ssl_speech_encoder(layer=-11, clip_samples=CLIP_16K).eval()
    wave = torch.randn(2, CLIP_16K)
    with torch.no_grad():
        frames = reference.extract_features(wave, num_layers=2)[0]
        out = enc(wave)
    assert torch.equal(out, frames[1].mean(1))
    assert not torch.allclose(out, frames[0].mean(1))


def test_ssl_encoder_resamples_input():
    enc_8k = build_ssl_speech_encoder(
        pretrained=False, layer=0, pooling="none", input_sample_rate=8000, clip_samples=2000
    )
    enc_16k = build_ssl_speech_encoder(
        pretrained=False, layer=0, pooling="none", clip_samples=CLIP_16K
    )
    enc_16k.backbone.load_state_dict(enc_8k.backbone.state_dict())
    assert isinstance(enc_8k.preprocess, torchaudio.transforms.Resample)
    assert enc_8k.out_shape == enc_16k.out_shape == (12, 768)
    wave = torch.randn(2, 2000)
    with torch.no_grad():
        expected = enc_16k.eval()(torchaudio.functional.resample(wave, 8000, 16000))
        assert torch.allclose(enc_8k.eval()(wave), expected, atol=1e-5)


def test_ssl_encoder_every_parameter_trains():
    enc = build_ssl_speech_encoder(pretrained=False, layer=0, clip_samples=CLIP_16K)
    enc(torch.randn(2, CLIP_16K)).sum().backward()
    untrained = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
    assert untrained == []


def test_ssl_pretrained_offline_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / WAV2VEC2_FILE
    with pytest.raises(WeightsUnavailableError) as info:
        build_ssl_speech_encoder("WAV2VEC2_BASE", layer=0, clip_samples=CLIP_16K)
    assert info.value.path == expected
    message = str(info.value)
    assert WAV2VEC2_FILE in message and str(expected.parent) in message
    assert "TORCH_HOME" in message


@pytest.mark.parametrize(
    ("bundle", "file"),
    [("HUBERT_BASE", "hubert_fairseq_base_ls960.pth"), ("MMS_FA", "model.pt")],  # MMS_FA: a URL
)
def test_ssl_weights_come_from_torch_hub_checkpoints(bundle, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        build_ssl_speech_encoder(bundle, layer=0, clip_samples=CLIP_16K)
    assert info.value.path == tmp_path / "hub" / "checkpoints" / file


def _cache_one_layer_checkpoint(torch_home, edit):
    """Cache a WAV2VEC2_BASE checkpoint of layer 0 only, changed by `edit`, as the bundle's file."""
    params = {**torchaudio.pipelines.WAV2VEC2_BASE._params, "encoder_num_layers": 1}
    state = edit(wav2vec2_model(**params).state_dict())
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / WAV2VEC2_FILE)


def test_ssl_checkpoint_may_hold_a_ctc_head(tmp_path, monkeypatch):
    """The bundle's CTC head (aux.*) is not built, so its keys are expected to be left over."""
    head = {"aux.weight": torch.zeros(29, 768), "aux.bias": torch.zeros(29)}
    _cache_one_layer_checkpoint(tmp_path, lambda state: {**state, **head})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enc = build_ssl_speech_encoder(layer=0, clip_samples=CLIP_16K)
    assert enc.out_shape == (768,)


def test_ssl_checkpoint_with_foreign_keys_does_not_fit(tmp_path, monkeypatch):
    extra = {"encoder.adapter.weight": torch.zeros(3)}
    _cache_one_layer_checkpoint(tmp_path, lambda state: {**state, **extra})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"does not fit.*'encoder\.adapter\.weight'"):
        build_ssl_speech_encoder(layer=0, clip_samples=CLIP_16K)


def test_ssl_checkpoint_missing_a_kept_layer_does_not_load(tmp_path, monkeypatch):
    _cache_one_layer_checkpoint(tmp_path, lambda state: state)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(IncompleteLoadError, match=r"missing.*encoder\.transformer\.layers\.1\."):
        build_ssl_speech_encoder(layer=1, clip_samples=CLIP_16K)


def test_ssl_unknown_bundle_lists_close_matches():
    with pytest.raises(ValueError, match=r"did you mean.*'WAV2VEC2_BASE'"):
        build_ssl_speech_encoder("WAV2VEC_BASE", pretrained=False)
    with pytest.raises(ValueError, match="not a wav2vec2-family"):
        build_ssl_speech_encoder("TACOTRON2_WAVERNN_CHAR_LJSPEECH", pretrained=False)


@pytest.mark.parametrize("layer", [12, -13])
def test_ssl_layer_out_of_range_names_the_layer_count(layer):
    with pytest.raises(ValueError, match="12 transformer layers"):
        build_ssl_speech_encoder(pretrained=False, layer=layer)


def test_ssl_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_ssl_speech_encoder(pretrained=False, pooling="attention")


def test_audio_config_files_exist():
    names = {p.stem for p in AUDIO_CONFIGS}
    assert names == {"logmel_resnet18", "mfcc_cnn", "wav2vec2_base", "hubert_base"}


@pytest.mark.parametrize("path", AUDIO_CONFIGS, ids=lambda p: p.stem)
def test_audio_configs_instantiate(path):
    """SSL configs are built untrained and one layer deep: the arguments are what is tested."""
    cfg = OmegaConf.load(path)
    overrides = {"pretrained": False, "layer": 0} if "pretrained" in cfg else {}
    data = {"sample_rate": 8000, "input_sample_rate": 8000, "clip_samples": 8000}
    overrides.update({k: v for k, v in data.items() if OmegaConf.is_missing(cfg, k)})
    enc = instantiate(cfg, **overrides)
    with torch.no_grad():
        assert enc.eval()(enc.example_input()).shape == (2, *enc.out_shape)


@pytest.mark.parametrize("path", AUDIO_CONFIGS, ids=lambda p: p.stem)
def test_audio_configs_land_on_the_audio_encoder(path):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"+model/encoder/audio={path.stem}"])
    assert cfg.model.encoders.audio == OmegaConf.load(path)


def test_logmel_resnet18_config_takes_rate_and_length_from_the_data():
    assert OmegaConf.to_container(OmegaConf.load(AUDIO_DIR / "logmel_resnet18.yaml")) == {
        "_target_": "fusion.encoders.build_spectrogram_encoder",
        "backbone": "resnet18",
        "weights": None,
        "sample_rate": "???",
        "clip_samples": "???",
        "n_fft": 256,
        "hop_length": 160,
        "n_mels": 32,
    }
