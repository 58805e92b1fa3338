"""Pictures from the JSONL file to ``forward(images=)``: the cache keeps each sample's pictures, packing
keeps every picture whole and in its row, and a packed batch with pictures gives the loss of its
samples run one by one."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.args import DataArgs
from finetune.data.images import image_spans
from finetune.data.loader import build_eval_batches, build_train_loader
from finetune.data.packing import cut_long
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data
from finetune.loss import TransformerWithLoss
from model.tiny import tiny_vision_args, write_random_vision_model
from model.transformer import Transformer
from tests.data_helpers import picture, write_image_tekken, write_jsonl

PATCH, MERGE = 16, 2
STEP = PATCH * MERGE  # pixels per [IMG] token along each side


def _conversation(images: list[str], question: str, answer: str) -> dict:
    content = [{"type": "image_url", "image_url": ref} for ref in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Pictures of several sizes (a few of the same size, so a swap would not show in the token counts),
    one as a data: URI, in samples of one, two and three pictures, one sample longer than seq_len."""
    root = tmp_path_factory.mktemp("vision-data")
    it = MistralTokenizer.from_file(str(write_image_tekken(root / "tok", MERGE))).instruct_tokenizer
    sizes = [(32, 32), (64, 32), (32, 96), (32, 32), (96, 64), (32, 32), (64, 64), (32, 64)]
    pics = [picture(root / "pics" / f"{i}.png", size, seed=i) for i, size in enumerate(sizes)]
    uri = "data:image/png;base64," + base64.b64encode(pics[5].read_bytes()).decode()
    refs = [f"pics/{i}.png" for i in range(len(sizes))]
    refs[5] = uri
    long_text = " ".join(f"word{i}" for i in range(40))
    lines = [
        _conversation([refs[0]], "What is this?", "A square."),
        _conversation([refs[1], refs[2]], "Compare them.", "Wide and tall."),
        _conversation([refs[3]], "And this?", "Another square."),
        _conversation([refs[4], refs[5], refs[6]], f"{long_text} Which is largest?", "The second."),
        _conversation([refs[7]], "Describe.", "Tall."),
        {"messages": [{"role": "user", "content": "No picture here."}, {"role": "assistant", "content": "Fine."}]},
    ]
    path = write_jsonl(root / "train.jsonl", lines)
    return {"root": root, "it": it, "path": path, "lines": lines, "pics": pics}


def _check(ws: dict, seq_len: int = 64):
    args = DataArgs(instruct_data=str(ws["path"]), cache_dir=str(ws["root"] / "cache"))
    report = check_data(args, ws["it"], seq_len)
    assert report.errors == []
    return report


def _reference(ws: dict) -> list:
    """mistral-common's tokens and pixels of every line, encoded directly from the JSONL objects."""
    return [encode_all(line, ws["it"], SampleType.INSTRUCT, chunk=False, base_dir=ws["path"].parent)[0]
            for line in ws["lines"]]


def _image_layout(image: np.ndarray, ids) -> list[int]:
    """The [IMG] run mistral-common writes for a picture of this (C, H, W) shape."""
    rows, cols = image.shape[1] // STEP, image.shape[2] // STEP
    run = ([ids.img] * cols + [ids.img_break]) * rows
    run[-1] = ids.img_end
    return run


def test_cache_reads_back_each_samples_pictures(workspace) -> None:
    [train] = _check(workspace).train
    reference = _reference(workspace)
    assert [len(train.images(i)) for i in range(len(train))] == [len(r.images) for r in reference]
    for i, ref in enumerate(reference):
        tokens, _ = train.arrays(i)
        assert tokens.tolist() == ref.tokens
        for ours, theirs in zip(train.images(i), ref.images, strict=True):
            np.testing.assert_array_equal(ours, theirs)  # re-encoded from the file (or data: URI) as tokenized
        spans = train.spans(i)
        special = workspace["it"].image_encoder.special_ids
        np.testing.assert_array_equal(spans, image_spans(np.asarray(ref.tokens), special))
    entry = train.files[0].entry
    # Files are referred to; the data: URI's picture is stored decoded; no pixels are cached.
    table = json.loads((entry / "images.json").read_text())
    assert sum("blob" in t for t in table) == 1 and sum("path" in t for t in table) == 7
    assert (entry / "images.bin").stat().st_size == workspace["pics"][5].stat().st_size


def _runs_match_pictures(x: np.ndarray, images: list[np.ndarray], ids) -> None:
    runs = image_spans(x, ids)
    assert len(runs) == len(images)
    for (start, end), image in zip(runs, images, strict=True):
        assert x[start:end].tolist() == _image_layout(image, ids)


@pytest.mark.parametrize("policy", ["split", "truncate"])
def test_rows_carry_their_pictures_whole_and_in_order(workspace, policy) -> None:
    seq_len = 64  # sample 3 (three pictures and 40 words) is longer: cut, but never inside a picture
    [train] = _check(workspace, seq_len).train
    assert int(train.positions.max()) > seq_len
    ids = workspace["it"].image_encoder.special_ids
    loader = build_train_loader([train], seq_len=seq_len, batch_size=2, seed=0, rank=0, world_size=1,
                                long_sample_policy=policy)
    seen = 0
    for _ in range(8):
        batch = next(loader)
        _runs_match_pictures(batch.x, batch.images, ids)
        # x is rows of seq_len: no run crosses a row boundary, and every run sits in one document
        starts = np.cumsum([0] + batch.seqlens)
        for a, b in image_spans(batch.x, ids):
            assert a // seq_len == (b - 1) // seq_len
            assert np.searchsorted(starts, a, side="right") == np.searchsorted(starts, b - 1, side="right")
        seen += len(batch.images)
    assert seen > 8
    for batch in build_eval_batches([train], seq_len=seq_len, batch_size=2, rank=0, world_size=1,
                                    long_sample_policy=policy):
        _runs_match_pictures(batch.x, batch.images, ids)


def test_a_cut_moves_back_to_the_start_of_a_picture() -> None:
    spans = np.array([[5, 12], [30, 40]])
    assert cut_long(50, 10, "split") == [(0, 10), (10, 10), (20, 10), (30, 10), (40, 10)]  # cuts 5..12
    pieces = cut_long(50, 10, "split", spans)
    assert pieces == [(0, 5), (5, 10), (15, 10), (25, 5), (30, 10), (40, 10)]
    assert sum(n for _, n in pieces) == 50
    for a, n in pieces:
        for s, e in spans:
            assert not (a < s < a + n < e) and not (s < a < e)  # no piece boundary inside a picture
    assert cut_long(50, 10, "truncate", spans) == [(0, 5)]


def test_a_picture_longer_than_seq_len_is_refused_with_its_line(workspace) -> None:
    [train] = _check(workspace, 5).train  # 32x96 px is 3 rows of 1 [IMG]: 6 tokens; 96x64 px, 8
    with pytest.raises(ValueError, match=r"^3 sample\(s\) .* seq_len 5, e\.g\. .*train\.jsonl:2 \(6 image tokens\); "
                       r".*train\.jsonl:4 \(8 image tokens\)"):
        build_train_loader([train], seq_len=5, batch_size=1, seed=0, rank=0, world_size=1,
                           long_sample_policy="split")


def test_a_changed_picture_is_tokenized_again(tmp_path) -> None:
    it = MistralTokenizer.from_file(str(write_image_tekken(tmp_path / "tok", MERGE))).instruct_tokenizer
    pic = picture(tmp_path / "p.png", (32, 32), seed=0)
    path = write_jsonl(tmp_path / "train.jsonl", [_conversation(["p.png"], "What?", "That.")])
    args = DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache"))
    first = check_data(args, it, 64).train[0]
    built = (first.files[0].entry / "meta.json").stat().st_mtime_ns
    assert check_data(args, it, 64).train[0].files[0].entry == first.files[0].entry
    assert (first.files[0].entry / "meta.json").stat().st_mtime_ns == built  # reused, not rebuilt
    picture(pic, (64, 96), seed=1)
    os.utime(pic, ns=(built + 10**9, built + 10**9))
    again = check_data(args, it, 64).train[0]
    assert again.images(0)[0].shape == (3, 96, 64)
    assert int(again.positions[0]) > int(first.positions[0])


@pytest.fixture(scope="module")
def model_folder(workspace) -> Path:
    folder = workspace["root"] / "model"
    write_random_vision_model(folder, tiny_vision_args(merge=MERGE, vocab_size=131072, dim=32, hidden_dim=64,
                                                       n_heads=2, n_kv_heads=1), seed=0)
    return folder


def test_packed_batch_with_pictures_equals_its_samples_one_by_one(workspace, model_folder) -> None:
    """The strongest check of the order: same-size pictures in different samples would give the same
    token counts if swapped, but not the same loss."""
    [train] = _check(workspace, 160).train
    assert int(train.positions.max()) <= 160  # no sample is cut: the batches hold whole samples
    model = TransformerWithLoss(Transformer.from_folder(model_folder, vision=True, dtype=torch.float64))
    batches = build_eval_batches([train], seq_len=160, batch_size=2, rank=0, world_size=1,
                                 long_sample_policy="split")
    assert sum(len(b.images) for b in batches) == 8 and max(len(b.seqlens) for b in batches) >= 4
    packed = sum(
        model(torch.from_numpy(b.x), b.seqlens, torch.from_numpy(b.y), torch.from_numpy(b.y_mask),
              [torch.from_numpy(im) for im in b.images])
        for b in batches
    )
    alone = 0.0
    for ref in _reference(workspace):
        t = torch.tensor(ref.tokens)
        mask = torch.tensor(ref.masks[1:])
        alone += model(t[:-1], [len(t) - 1], t[1:], mask, [torch.from_numpy(im) for im in ref.images])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=0)
    # The check can fail: two same-size pictures of a row, swapped, change the loss.
    def loss(b, images):
        return model(torch.from_numpy(b.x), b.seqlens, torch.from_numpy(b.y), torch.from_numpy(b.y_mask),
                     [torch.from_numpy(im) for im in images])

    pairs = [(b, i, j) for b in batches for i in range(len(b.images)) for j in range(i + 1, len(b.images))
             if b.images[i].shape == b.images[j].shape]
    assert pairs, "the data has same-size pictures packed together"
    b, i, j = pairs[0]
    swapped = list(b.images)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert not torch.isclose(loss(b, swapped), loss(b, b.images), rtol=1e-6)


def test_split_data_warns_when_relative_pictures_would_not_follow(workspace, tmp_path, capsys) -> None:
    from utils import split_data

    assert split_data.main([str(workspace["path"]), "--output_dir", str(tmp_path / "elsewhere")]) == 0
    assert "warning: 5 line(s) name pictures by paths relative to" in capsys.readouterr().err  # of 6 (one has no picture)
    assert split_data.main([str(workspace["path"])]) == 0  # next to the file: the paths still resolve
    assert "warning" not in capsys.readouterr().err
    for name in ("train", "eval", "test"):
        (workspace["path"].parent / f"train.{name}.jsonl").unlink()


@pytest.mark.parametrize("case", ["text_only_model", "other_merge"])
def test_validate_data_names_a_model_that_cannot_read_the_pictures(workspace, tmp_path, capsys, case) -> None:
    from model.tiny import tiny_args, write_random_model
    from utils import validate_data

    folder = tmp_path / "model"
    dims = dict(vocab_size=131072, dim=32, hidden_dim=64, n_heads=2, n_kv_heads=1)
    if case == "text_only_model":
        write_random_model(folder, tiny_args(**dims))
        write_image_tekken(folder, merge=MERGE)
        want = "has none (its params.json has no 'vision_encoder' block"
    else:
        write_random_vision_model(folder, tiny_vision_args(merge=1, **dims))
        write_image_tekken(folder, merge=MERGE)
        want = "the tokenizer cuts pictures into 16-pixel patches merged 2x2 per [IMG] token (id 10), but the " \
               "vision encoder reads 16-pixel patches merged 1x1"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model_id_or_path": str(folder), "seq_len": 160, "run_dir": str(tmp_path / "r"),
                                  "data": {"instruct_data": str(workspace["path"]),
                                           "cache_dir": str(workspace["root"] / "cache")}}))
    assert validate_data.main(["--train_yaml", str(config)]) == 1
    assert want in capsys.readouterr().err


def test_llava_rows_and_developer_roles_are_sent_to_reformat(workspace) -> None:
    from finetune.data.errors import DataFormatError

    llava = {"images": ["pics/0.png"], "messages": [{"role": "user", "content": "<image> What?"},
                                                     {"role": "assistant", "content": "A square."}]}
    with pytest.raises(DataFormatError, match=r"top-level 'images' \(LLaVA.*reformat_data FILE` place them"):
        encode_all(llava, workspace["it"], SampleType.INSTRUCT, chunk=False, base_dir=workspace["path"].parent)
    developer = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(DataFormatError, match=r"reformat_data FILE` convert it"):
        encode_all(developer, workspace["it"], SampleType.INSTRUCT, chunk=False)


def test_vision_targets_without_pictures_are_refused(workspace, model_folder, tmp_path, capsys) -> None:
    from utils import validate_data

    write_image_tekken(model_folder, merge=MERGE)
    text = write_jsonl(tmp_path / "text.jsonl", [workspace["lines"][-1]] * 3)  # no picture
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "model_id_or_path": str(model_folder), "seq_len": 64, "run_dir": str(tmp_path / "r"),
        "lora": {"target_modules": ["wq", "vision_language_adapter.w_in"]},
        "data": {"instruct_data": str(text), "cache_dir": str(tmp_path / "cache")}}))
    assert validate_data.main(["--train_yaml", str(config)]) == 1
    assert "names vision layers (vision_language_adapter.w_in), but the data has no pictures" in capsys.readouterr().err


def test_the_vision_example_config_loads() -> None:
    from finetune.args import load_train_args

    args = load_train_args("example/mistral_small_3.2_vision.yaml")
    assert "vision_language_adapter.w_in" in args.lora.target_modules and args.seq_len == 8192
