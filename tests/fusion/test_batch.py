from typing import ClassVar

import numpy as np
import pytest
import torch

from fusion.batch import Collate, collate


def test_collate_builds_dicts_keyed_by_modality(avdigits_val):
    batch = collate([avdigits_val[i] for i in range(4)])
    assert set(batch.inputs) == {"audio", "image"}
    assert batch.inputs["image"].shape == (4, 1, 8, 8)
    assert batch.inputs["audio"].shape == (4, avdigits_val.clip_samples)
    assert batch.targets.shape == (4,) and batch.targets.dtype == torch.int64
    assert all(p.all() for p in batch.present.values())
    assert batch.condition is None and len(batch) == 4


def test_missing_modality_becomes_mask_and_zeros():
    items = [
        {"image": torch.ones(2), "audio": torch.ones(3), "label": 0},
        {"image": torch.ones(2), "audio": None, "label": 1},
        {"image": torch.ones(2), "label": 2},
    ]
    batch = collate(items)
    assert batch.present["audio"].tolist() == [True, False, False]
    assert batch.inputs["audio"][1:].abs().sum() == 0


def test_condition_is_collected():
    batch = collate([{"x": torch.zeros(1), "label": 0, "condition": 1}] * 2)
    assert batch.condition.tolist() == [1, 1]


def test_variable_lengths_are_padded_with_a_mask():
    items = [
        {"audio": torch.ones(3), "seq": torch.ones(2, 4), "label": 0},
        {"audio": torch.full((5,), 2.0), "seq": None, "label": 1},
        {"audio": None, "seq": torch.ones(4, 4), "label": 2},
    ]
    batch = Collate(padded=["audio"])(items)  # waveforms: declared; [T, D] sequences: by shape
    assert batch.inputs["audio"].tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [0, 0, 0, 0, 0]]
    assert batch.present["audio"].tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [False] * 5,
    ]
    assert batch.inputs["seq"].shape == (3, 4, 4)
    assert batch.present["seq"].sum(1).tolist() == [2, 0, 4]


def test_table_rows_of_different_sizes_are_refused_not_padded():
    items = [{"tab": torch.randn(4), "label": 0}, {"tab": torch.randn(3), "label": 1}]
    with pytest.raises(ValueError) as caught:
        collate(items)
    message = str(caught.value)
    assert message.startswith("modality 'tab': item 1 has 3 values, item 0 has 4; ")
    assert "vectors (a table row), which are never padded" in message
    assert "Collate(padded=['tab'])" in message
    # declared a sequence (a waveform), the same items are padded with a [B, T] mask
    batch = Collate(padded=["tab"])(items)
    assert batch.present["tab"].tolist() == [[True] * 4, [True] * 3 + [False]]


@pytest.mark.parametrize(
    ("kind", "values", "message"),
    [
        ("tabular", [torch.zeros(4), torch.zeros(3)], r"modality 'm' \(tabular\): item 1 has 3 values, item 0 has 4; every item of a tabular modality has one shape"),
        ("image", [torch.zeros(1, 8, 8), torch.zeros(3, 8, 8)], r"modality 'm' \(image\): item 1 has shape \(3, 8, 8\), item 0 has \(1, 8, 8\); .*only audio and features modalities are padded"),
    ],
)  # fmt: skip
def test_a_declared_kind_that_is_no_sequence_is_never_padded(kind, values, message):
    items = [{"m": v, "label": i} for i, v in enumerate(values)]
    with pytest.raises(ValueError, match=message):
        Collate(kinds={"m": kind})(items)


def test_audio_and_feature_kinds_are_padded_as_sequences():
    from fusion.data import Modality

    class Ragged:
        modalities: ClassVar = {
            "wave": Modality("audio", {"shape": [None]}),
            "feats": Modality("features", {"shape": [None, 2], "input_dim": 2}),
            "row": Modality("tabular", {"shape": [3]}),
        }

        def __len__(self):
            return 2

        def __getitem__(self, i):
            n = 2 + i
            return {
                "wave": torch.ones(n),
                "feats": torch.ones(n, 2),
                "row": torch.ones(3),
                "label": i,
            }

    collate_fn = Collate.for_dataset(Ragged())
    assert collate_fn.padded == {"wave", "feats"}
    batch = collate_fn([Ragged()[0], Ragged()[1]])
    assert batch.present["wave"].tolist() == [[True, True, False], [True, True, True]]
    assert batch.present["feats"].shape == (2, 3) and batch.present["row"].shape == (2,)
    with pytest.raises(ValueError, match=r"modality 'row' \(tabular\): item 1 has 4 values"):
        collate_fn([Ragged()[0], {**Ragged()[1], "row": torch.ones(4)}])


def test_padded_must_be_a_list_of_names():
    with pytest.raises(
        TypeError, match=r"padded must be a list of modality names, got str 'audio'"
    ):
        Collate(padded="audio")


def test_shape_mismatch_beyond_the_length_names_modality_items_and_shapes():
    items = [{"seq": torch.zeros(3, 8), "label": 0}, {"seq": torch.zeros(3, 6), "label": 0}]
    with pytest.raises(
        ValueError, match=r"modality 'seq': item 1 has shape \(3, 6\), item 0 has \(3, 8\)"
    ):
        collate(items)


def test_a_modality_absent_from_the_whole_batch_is_a_masked_placeholder(avdigits_val):
    collate_fn = Collate.for_dataset(avdigits_val)
    items = [{**avdigits_val[i], "audio": None} for i in range(3)]
    batch = collate_fn(items)
    assert batch.inputs["audio"].shape == (3, avdigits_val.clip_samples)
    assert not batch.present["audio"].any() and batch.inputs["audio"].abs().sum() == 0
    with pytest.raises(ValueError, match=r"modality 'audio' is missing from every item"):
        collate(items)  # without the dataset, nothing says its shape


def test_missing_label_is_named():
    with pytest.raises(KeyError, match="item 0 has no 'label'"):
        collate([{"audio": torch.zeros(8)}])


def test_text_stays_a_list_of_strings():
    items = [
        {"text": t, "x": torch.zeros(1), "label": i} for i, t in enumerate(["one", None, "three"])
    ]
    batch = collate(items)
    assert batch.inputs["text"] == ["one", "", "three"]
    assert batch.present["text"].tolist() == [True, False, True]
    assert batch.to("cpu").inputs["text"] == ["one", "", "three"]


BAD_ITEMS = {
    "float64-beside-float32": (
        [{"a": torch.zeros(2), "label": 0}, {"a": torch.zeros(2, dtype=torch.float64), "label": 1}],
        ValueError,
        r"modality 'a': item 1 is torch.float64, item 0 is torch.float32; every item of a "
        r"modality needs the same dtype",
    ),
    "ints-beside-floats-padded": (
        [{"a": torch.zeros(3), "label": 0}, {"a": torch.zeros(5, dtype=torch.long), "label": 1}],
        ValueError,
        r"modality 'a': item 1 is torch.int64, item 0 is torch.float32",
    ),
    "numpy-float64-beside-float32": (
        [{"a": np.zeros(2, dtype=np.float32), "label": 0}, {"a": np.zeros(2), "label": 1}],
        ValueError,
        r"modality 'a': item 1 is torch.float64, item 0 is torch.float32",
    ),
    "text-beside-tensor": (
        [{"a": "a caption", "label": 0}, {"a": torch.zeros(2), "label": 1}],
        ValueError,
        r"modality 'a': item 0 is text \(str\), item 1 is a Tensor; a modality is text in "
        r"every item or in none",
    ),
    "not-a-tensor": (
        [{"a": torch.zeros(2), "label": 0}, {"a": object(), "label": 1}],
        ValueError,
        r"modality 'a': item 1 is a object, expected a tensor, a numpy array or a list of "
        r"numbers",
    ),
    "not-a-dict": (
        [{"a": torch.zeros(2), "label": 0}, (torch.zeros(2), 1)],
        TypeError,
        r"item 1 is a tuple, expected a dict of modality name -> value",
    ),
    "a word as the first label": (
        [{"a": torch.zeros(1), "label": "cat"}, {"a": torch.zeros(1), "label": 1}],
        ValueError,
        r"item 0: 'label' is str 'cat'; expected a number: labels are class indices",
    ),
    "a label of another kind": (
        [{"a": torch.zeros(1), "label": 0}, {"a": torch.zeros(1), "label": "cat"}],
        ValueError,
        r"item 1: 'label' is str 'cat'; expected a number: labels are class indices",
    ),
    "a task's label of another kind": (
        [{"a": torch.zeros(1), "label": {"t": 1}}, {"a": torch.zeros(1), "label": {"t": None}}],
        ValueError,
        r"item 1: 'label.t' is NoneType None; expected a number: labels are class indices",
    ),
    "a NaN label": (
        [{"a": torch.zeros(1), "label": float("nan")}, {"a": torch.zeros(1), "label": 1.0}],
        ValueError,
        r"item 0: 'label' is nan; expected a finite number",
    ),
    "a negative class index": (
        [{"a": torch.zeros(1), "label": 1}, {"a": torch.zeros(1), "label": -1}],
        ValueError,
        r"item 1: 'label' is -1; expected a class index >= 0",
    ),
    "an item without any modality": (
        [
            {"a": torch.zeros(1), "b": None, "label": 0},
            {"a": None, "b": None, "label": 1},
            {"b": torch.ones(1), "label": 0},
        ],
        ValueError,
        r"item 1 has no modality: each of \['a', 'b'\] is missing \(None or no key\)",
    ),
}


@pytest.mark.parametrize("case", BAD_ITEMS)
def test_bad_items_are_named_not_promoted(case):
    items, error, message = BAD_ITEMS[case]
    with pytest.raises(error, match=message):
        collate(items)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0.5, 1.5], r"'label': task 'y' \(multiclass\) takes class indices, found torch.float32 labels \[0.5, 1.5\]"),
        ([0, -1], r"item 1: 'label' is -1; expected a class index >= 0"),
        ([3, 0], r"item 0: 'label' is 3; task 'y' has 3 classes, so a label is an index in \[0, 2\]"),
    ],
)  # fmt: skip
def test_a_collate_that_knows_the_tasks_names_labels_that_are_no_class_index(labels, message):
    from fusion.data import Task

    collate_for = Collate(tasks={"y": Task("multiclass", ("a", "b", "c"))})
    items = [{"x": torch.zeros(1), "label": label} for label in labels]
    with pytest.raises(ValueError, match=message):
        collate_for(items)
    assert collate_for([{"x": torch.zeros(1), "label": 2}]).targets.tolist() == [2]


def test_tensor_labels_of_several_targets_stack_and_mismatched_shapes_are_named():
    items = [{"x": torch.zeros(3), "label": torch.tensor([1.0, 2.0])},
             {"x": torch.ones(3), "label": torch.tensor([3.0, 4.0])}]  # fmt: skip
    torch.testing.assert_close(collate(items).targets, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    items[1]["label"] = torch.tensor([3.0])
    with pytest.raises(ValueError, match=r"item 1: 'label' is a tensor of shape \[1\], item 0's"):
        collate(items)
