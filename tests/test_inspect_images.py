"""inspect_data on image conversations: each picture's token run shows as one marker where it sits, with
counts read from the real tokens of a tokenizer with an image config, and never inside the trained spans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.tokenize import SampleType, encode_all
from tests.data_helpers import bundled_tekken_with_images, picture, write_image_tekken, write_jsonl
from tests.model_helpers import write_checkpoint
from tests.train_helpers import tiny_vocab_args
from utils import inspect_data

PATCH = 16  # tekken_240911.json's image config: 16-pixel patches, no spatial merge
V3 = MistralTokenizer.from_file(str(bundled_tekken_with_images())).instruct_tokenizer


def workspace(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny model whose tokenizer file has an image config, and a sample with two pictures."""
    model = tmp_path / "model"
    write_checkpoint(model, tiny_vocab_args(vocab_size=131072, dim=8, hidden_dim=16, n_heads=2, n_kv_heads=1,
                                            head_dim=4, n_layers=1), tokenizer=False)
    shutil.copy(bundled_tekken_with_images(), model / "tekken.json")
    picture(tmp_path / "data" / "pics" / "wide.png", (2 * PATCH, 3 * PATCH), 0)  # 2 columns, 3 rows
    picture(tmp_path / "data" / "one.png", (5, 7), 1)  # one patch
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Which is bigger?"},
                                     {"type": "image_url", "image_url": "pics/wide.png"},
                                     {"type": "text", "text": "or"},
                                     {"type": "image_url", "image_url": "one.png"}]},
        {"role": "assistant", "content": "The first."},
    ]}
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [row])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_id_or_path": str(model), "run_dir": str(tmp_path / "run"),
                                      "data": {"instruct_data": str(data), "cache_dir": str(tmp_path / "cache")},
                                      "seq_len": 256, "batch_size": 1, "max_steps": 1}))
    return config, row


def test_inspect_collapses_each_picture_into_a_marker_counted_from_the_tokens(tmp_path, capsys) -> None:
    config, row = workspace(tmp_path)
    it = V3
    [ts] = encode_all(row, it, SampleType.INSTRUCT, chunk=False, base_dir=tmp_path / "data")
    ids = it.image_encoder.special_ids
    assert ts.tokens.count(ids.img_end) == 2  # the reference the markers are checked against

    assert inspect_data.main(["--train_yaml", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    n_image = sum(t in (ids.img, ids.img_break, ids.img_end) for t in ts.tokens)
    assert f": {len(ts.tokens)} tokens, {sum(ts.masks)} trained, 2 image(s) ({n_image} image tokens)" in out
    wide = "[image 1: 32x48 px -> 3 rows x 2 = 6 [IMG] + 2 [IMG_BREAK] + [IMG_END], 9 tokens]"
    one = "[image 2: 16x16 px -> 1 row x 1 = 1 [IMG] + 0 [IMG_BREAK] + [IMG_END], 2 tokens]"
    assert n_image == 9 + 2
    # Where the tokens put them (in the order of the chunks), no image token left over, the answer alone trained.
    assert f"<s>[INST]Which is bigger?{wide}or{one}[/INST]«The first.</s>»" in out
    assert "[IMG]" not in out.replace(wide, "").replace(one, "")

    assert inspect_data.main(["--train_yaml", str(config), "--json"]) == 0
    [shown] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown["tokens"] == ts.tokens and shown["n_image_tokens"] == n_image
    first, second = shown["images"]
    assert ts.tokens[first["start"]:first["end"]] == [ids.img, ids.img, ids.img_break] * 2 + [ids.img, ids.img,
                                                                                             ids.img_end]
    assert (first["rows"], first["cols"], first["width"], first["height"]) == (3, 2, 32, 48)
    assert (second["n_img"], second["n_img_end"], second["end"] - second["start"]) == (1, 1, 2)
    assert not any(ts.masks[d["start"]:d["end"]].count(True) for d in shown["images"])
    assert first["n_trained"] == second["n_trained"] == 0


def test_markers_count_the_tokens_they_replace() -> None:
    """The marker is computed from the run, so a run that is not what the picture should give says so:
    here a missing [IMG] and a trained token, which the encoder never produces."""
    it = V3
    img, brk, end = (getattr(it.image_encoder.special_ids, k) for k in ("img", "img_break", "img_end"))
    tokens = [1, 3, img, img, brk, img, end, 100, img, end, 4]
    masks = [False] * 9 + [True, True]
    runs = inspect_data.image_runs(tokens, it)
    assert runs == [(2, 7), (8, 10)]
    d = inspect_data.describe_image(tokens[2:7], masks[2:7], it, None)
    assert inspect_data.image_marker(1, d) == "[image 1: 2 rows, uneven = 3 [IMG] + 1 [IMG_BREAK] + [IMG_END], 5 tokens]"
    d2 = inspect_data.describe_image(tokens[8:10], masks[8:10], it, np.zeros((3, 16, 32)))
    assert inspect_data.image_marker(2, d2) == (
        "[image 2: 32x16 px -> 1 row x 1 = 1 [IMG] + 0 [IMG_BREAK] + [IMG_END], 2 tokens, 1 TRAINED]"
    )
    pieces = [it.tokenizer.id_to_piece(t) for t in tokens]
    shown = inspect_data.render(*inspect_data.collapse_images(pieces, masks, runs, ["<1>", "<2>"]), color=False)
    assert shown == "<s>[INST]<1>" + pieces[7] + "«<2>[/INST]»"


def test_markers_of_a_tokenizer_that_merges_patches_count_merged_tokens(tmp_path) -> None:
    """With spatial_merge_size 2 (Mistral Small 3.1) one [IMG] stands for 2x2 patches: the grid is the tokens'."""
    it = MistralTokenizer.from_file(str(write_image_tekken(tmp_path, merge=2))).instruct_tokenizer
    picture(tmp_path / "p.png", (4 * PATCH, 6 * PATCH), 0)  # 4x6 patches -> 2x3 tokens
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "p.png"}]},
                        {"role": "assistant", "content": "ok"}]}
    [ts] = encode_all(row, it, SampleType.INSTRUCT, chunk=False, base_dir=tmp_path)
    [(a, b)] = inspect_data.image_runs(ts.tokens, it)
    d = inspect_data.describe_image(ts.tokens[a:b], ts.masks[a:b], it, ts.images[0])
    assert inspect_data.image_marker(1, d) == (
        "[image 1: 64x96 px -> 3 rows x 2 = 6 [IMG] + 2 [IMG_BREAK] + [IMG_END], 9 tokens]"
    )
