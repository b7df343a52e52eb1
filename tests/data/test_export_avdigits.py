import pandas as pd
import pytest
import torch

from data.avdigits import AVDigits
from data.export_avdigits import main
from data.manifest import ManifestDataset

SPLITS = ("train", "val", "test")


def test_export_reads_back_as_the_fixed_avdigits_draw(tmp_path, capsys):
    manifest = main([str(tmp_path / "out"), "--max-samples", "3", "--seed", "1"])
    assert "wrote 9 samples (3 train, 3 val, 3 test)" in capsys.readouterr().out
    table = pd.read_csv(manifest)
    assert list(table.columns) == ["image", "audio", "label", "split"]
    assert table["split"].tolist() == ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    assert table["image"][4] == "images/val_1.png" and table["audio"][4] == "audio/val_1.wav"

    originals = {s: AVDigits(s, augment=False, max_samples=3, seed=1) for s in SPLITS}
    peak = max(float(item["audio"].abs().max()) for d in originals.values() for item in d)
    for split, original in originals.items():
        exported = ManifestDataset(split, path=manifest, target="label", audio_sample_rate=8000)
        classes = exported.tasks["label"].classes
        assert exported.modalities["image"].info["shape"] == [1, 8, 8]
        assert exported.modalities["audio"].info["clip_samples"] == original.clip_samples
        for item, want in zip(exported, original, strict=True):
            assert classes[item["label"]] == str(want["label"])
            assert torch.allclose(item["image"], want["image"].clamp(0, 1), atol=1 / 255)
            assert torch.allclose(item["audio"], want["audio"] / peak, atol=2 / 32768)


def test_an_export_refuses_a_folder_holding_files_it_would_overwrite(tmp_path, capsys):
    import pytest

    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "manifest.csv").write_text("my,own\n")
    (mine / "images" / "train_0.png").write_bytes(b"my picture")
    with pytest.raises(SystemExit) as caught:
        main([str(mine), "--max-samples", "5"])
    assert caught.value.code == 2
    assert (
        f"argument out_dir: {mine} already holds 2 of the files this export would write "
        "(manifest.csv, images/train_0.png); nothing was written. Choose a new or empty folder, "
        "or pass --overwrite to replace them"
    ) in capsys.readouterr().err
    assert (mine / "manifest.csv").read_text() == "my,own\n"
    assert (mine / "images" / "train_0.png").read_bytes() == b"my picture"
    assert not (mine / "audio").exists()
    main([str(mine), "--max-samples", "2", "--overwrite"])
    assert (mine / "manifest.csv").read_text().startswith("image,audio,label,split")


def test_an_export_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.csv").write_text("mine")
    for out in (tmp_path / "notes.csv", tmp_path / "notes.csv" / "sub"):
        with pytest.raises(SystemExit):
            main([str(out), "--max-samples", "2"])
        err = capsys.readouterr().err
        assert f"argument out_dir: expected a folder, but {tmp_path / 'notes.csv'} is a file" in err
    assert (tmp_path / "notes.csv").read_text() == "mine"
