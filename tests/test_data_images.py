"""Images in user messages: tokens, masks and pictures equal mistral-common's own encoding; every bad
picture is an error with file, line and the chunk it came from."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageURLChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.args import DataArgs
from finetune.data.errors import DataFormatError
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data
from tests.data_helpers import (
    bundled_tekken_with_images,
    picture,
    tekken,
    tekken_v,
    write_image_tekken,
    write_jsonl,
)


def merged_patches_tokenizer(folder: Path) -> object:
    """A v13 file whose image config merges 2x2 patches into one token (as Mistral Small 3.1's does)."""
    return MistralTokenizer.from_file(str(write_image_tekken(folder, 2))).instruct_tokenizer


_MERGE_DIR = tempfile.TemporaryDirectory(prefix="tekken-merge-")  # removed when the test process ends
IMAGE_TOKENIZERS = {
    "tekken_v3": MistralTokenizer.from_file(str(bundled_tekken_with_images())).instruct_tokenizer,
    **{f"tekken_{v}": tekken_v(v, image=True) for v in ("v7", "v11", "v13")},
    "tekken_v13_merge2": merged_patches_tokenizer(Path(_MERGE_DIR.name)),
}
V3 = IMAGE_TOKENIZERS["tekken_v3"]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def pictures(folder: Path) -> dict[str, Path]:
    # Different sizes: one patch, a wide strip, a tall one, and one over max_image_size (downscaled).
    return {
        "tiny": picture(folder / "pics" / "tiny.png", (5, 7), 0),
        "wide": picture(folder / "pics" / "wide.jpg", (70, 20), 1, "JPEG"),
        "tall": picture(folder / "tall.png", (18, 50), 2),
        "big": picture(folder / "big.png", (1100, 30), 3),
    }


def image_sample(folder: Path) -> tuple[dict, list[list]]:
    """A multi-turn sample with four images in three forms, and the same conversation as mistral-common
    chunks (file:// and data: URIs)."""
    p = pictures(folder)
    sample = {
        "messages": [
            {"role": "system", "content": "Describe pictures."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "text", "text": "And in detail?"},
                {"type": "image_url", "image_url": "pics/tiny.png"}]},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "pics/wide.jpg"}},
                {"type": "text", "text": "Compare with"},
                {"type": "image", "image": str(p["tall"])},
                {"type": "image_url", "image_url": data_uri(p["big"])}]},
            {"role": "assistant", "content": "More noise."},
        ]
    }
    ref = [
        # mistral-common's normalizer joins adjacent text chunks with a blank line
        [TextChunk(text="What is this?\n\nAnd in detail?"), ImageURLChunk(image_url=f"file://{p['tiny']}")],
        [ImageURLChunk(image_url=f"file://{p['wide']}"), TextChunk(text="Compare with"),
         ImageURLChunk(image_url=f"file://{p['tall']}"), ImageURLChunk(image_url=data_uri(p["big"]))],
    ]
    return sample, ref


def reference(sample: dict, user_contents: list[list], it) -> tuple[list[int], list[np.ndarray]]:
    """What serving encodes: a ChatCompletionRequest, the version's normalizer, encode_instruct."""
    contents = iter(user_contents)
    msgs = []
    for m in sample["messages"]:
        if m["role"] == "system":
            msgs.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            msgs.append(UserMessage(content=next(contents) if isinstance(m["content"], list) else m["content"]))
        else:
            msgs.append(AssistantMessage(content=m["content"]))
    request = get_normalizer(it.tokenizer.version).from_chat_completion_request(ChatCompletionRequest(messages=msgs))
    tokenized = it.encode_instruct(request)
    return tokenized.tokens, tokenized.images


def image_ids(it) -> set[int]:
    ids = it.image_encoder.special_ids
    return {ids.img, ids.img_break, ids.img_end}


@pytest.mark.parametrize("name", sorted(IMAGE_TOKENIZERS))
def test_image_conversation_equals_mistral_common(tmp_path, name) -> None:
    it = IMAGE_TOKENIZERS[name]
    sample, ref = image_sample(tmp_path)
    [ts] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False, base_dir=tmp_path)
    tokens, images = reference(sample, ref, it)
    assert ts.tokens == tokens
    assert len(ts.images) == len(images) == 4
    for ours, theirs in zip(ts.images, images, strict=True):
        assert ours.dtype == np.float32 and ours.ndim == 3 and ours.shape[0] == 3
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=0, atol=0)
    # Sizes differ, and the 1100-pixel picture was scaled down to at most max_image_size.
    shapes = [im.shape for im in ts.images]
    assert len(set(shapes)) == 4 and max(s[2] for s in shapes) <= it.image_encoder.image_config.max_image_size
    # Image tokens are never targets; the image runs are where mistral-common puts them, and without them
    # the sample is exactly the text-only conversation (image moved first where it followed text alone).
    special = image_ids(it)
    assert not any(m for t, m in zip(ts.tokens, ts.masks, strict=True) if t in special)
    assert sum(t == it.image_encoder.special_ids.img_end for t in ts.tokens) == 4
    text_only = json.loads(json.dumps(sample))
    text_only["messages"][1]["content"] = "What is this?\n\nAnd in detail?"
    text_only["messages"][3]["content"] = "Compare with"
    [plain] = encode_all(text_only, it, SampleType.INSTRUCT, chunk=False)
    keep = [t not in special for t in ts.tokens]
    assert [t for t, k in zip(ts.tokens, keep, strict=True) if k] == plain.tokens
    assert [m for m, k in zip(ts.masks, keep, strict=True) if k] == plain.masks


def test_image_forms_agree(tmp_path) -> None:
    """The path, OpenAI {"url"}, file://, data: URI and raw base64 (mistral-common's ImageChunk
    serialisation) forms of one picture encode the same."""
    path = picture(tmp_path / "a.png", (33, 17), 7)
    forms = [
        {"type": "image_url", "image_url": "a.png"},
        {"type": "image_url", "image_url": {"url": str(path)}},
        {"type": "image_url", "image_url": f"file://{path}"},
        {"type": "image", "image": data_uri(path)},
        {"type": "image", "image": base64.b64encode(path.read_bytes()).decode()},
    ]
    results = []
    for chunk in forms:
        sample = {"messages": [{"role": "user", "content": [chunk]}, {"role": "assistant", "content": "x"}]}
        [ts] = encode_all(sample, V3, SampleType.INSTRUCT, chunk=False, base_dir=tmp_path)
        results.append(ts)
    for ts in results[1:]:
        assert ts.tokens == results[0].tokens
        torch.testing.assert_close(torch.from_numpy(ts.images[0]), torch.from_numpy(results[0].images[0]))
    # 33x17 pixels, 16-pixel patches: 3 columns, 2 rows of [IMG], each row closed by [IMG_BREAK] / [IMG_END].
    ids = V3.image_encoder.special_ids
    run = ([ids.img] * 3 + [ids.img_break]) * 2
    run[-1] = ids.img_end
    start = results[0].tokens.index(ids.img)
    assert results[0].tokens[start : start + len(run)] == run
    assert results[0].images[0].shape == (3, 32, 48)


def test_chunked_prefixes_carry_their_own_images(tmp_path) -> None:
    sample, _ = image_sample(tmp_path)
    sample["only_last"] = True
    full, prefix = encode_all(sample, V3, SampleType.INSTRUCT, chunk=True, base_dir=tmp_path)
    assert len(full.images) == 4 and len(prefix.images) == 1
    torch.testing.assert_close(torch.from_numpy(prefix.images[0]), torch.from_numpy(full.images[0]))


def _user_image(chunk: dict) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, chunk]},
        {"role": "assistant", "content": "A picture."},
    ]}


def test_bad_images_reported_with_file_line_and_chunk(tmp_path) -> None:
    picture(tmp_path / "ok.png", (8, 8), 0)
    (tmp_path / "notes.png").write_text("not a picture")
    good = picture(tmp_path / "cut.png", (64, 64), 1).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    lines = [
        _user_image({"type": "image_url", "image_url": "https://example.com/cat.png"}),
        _user_image({"type": "image_url", "image_url": "missing.png"}),
        _user_image({"type": "image_url", "image_url": {"url": "notes.png"}}),
        _user_image({"type": "image", "image": "cut.png"}),
        _user_image({"type": "image_url", "image_url": "data:image/png;base64,@@@"}),
        _user_image({"type": "image_url", "image_url": 3}),
        _user_image({"type": "video", "video": "a.mp4"}),
        _user_image({"type": "image_url", "image_url": "ok.png"}),
    ]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    report = check_data(DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache")), V3, 512)
    got = {e.line: (e.kind, str(e)) for e in report.errors}
    assert sorted(got) == list(range(1, 8))  # line 8's picture is fine: it trains
    [train] = report.train
    assert len(train) == 1 and train.files[0].lines.tolist() == [8]
    expected = {
        1: ("bad_image", "message 0 (user) content chunk 1 is the URL 'https://example.com/cat.png'; training never downloads"),
        2: ("bad_image", f"message 0 (user) image 0 names the image file {tmp_path / 'missing.png'}, which does not exist"),
        3: ("bad_image", f"message 0 (user) image 0: {tmp_path / 'notes.png'} is not in an image format Pillow reads"),
        4: ("bad_image", f"message 0 (user) image 0: {tmp_path / 'cut.png'} cannot be decoded"),
        5: ("bad_image", "payload is not valid base64"),
        6: ("bad_image", "message 0 (user) content chunk 1 'image_url' is 3; write a file path or a data: URI"),
        7: ("bad_chunk", "message 0 (user) content chunk 1 is"),
    }
    for line, (kind, text) in expected.items():
        assert got[line][0] == kind, (line, got[line])
        assert got[line][1].startswith(f"{path}:{line}: ") and text in got[line][1], got[line]


def test_tokenizer_without_image_encoder_refuses_images(tmp_path) -> None:
    picture(tmp_path / "ok.png", (8, 8), 0)
    sample = _user_image({"type": "image_url", "image_url": "ok.png"})
    path = write_jsonl(tmp_path / "train.jsonl", [sample])
    text_only = tekken()  # tekken_240718.json: no image config
    assert text_only.image_encoder is None
    report = check_data(DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache")), text_only, 512)
    [e] = report.errors
    assert (e.line, e.kind) == (1, "no_image_encoder")
    assert str(e).startswith(f"{path}:1: message 0 (user) has an image, but this model's tokenizer has no image encoder")
    with pytest.raises(DataFormatError, match="has no image encoder"):
        encode_all(sample, tekken_v("v13"), SampleType.INSTRUCT, chunk=False, base_dir=tmp_path)


def test_text_chunks_alone_equal_a_string(tmp_path) -> None:
    """A user content list of text only is the string mistral-common's normalizer makes of it, on any
    tokenizer (no image encoder needed)."""
    chunks = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
    ]}
    plain = {"messages": [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]}
    for it in (tekken(), V3):
        assert encode_all(chunks, it, SampleType.INSTRUCT, chunk=False) == encode_all(
            plain, it, SampleType.INSTRUCT, chunk=False
        )



def test_image_verdicts_are_not_reused_from_the_cache(tmp_path) -> None:
    """The cache key hashes the JSONL file, not the pictures: adding a missing picture changes the verdict."""
    sample = _user_image({"type": "image_url", "image_url": "later.png"})
    path = write_jsonl(tmp_path / "train.jsonl", [sample])
    args = DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache"))
    assert [e.kind for e in check_data(args, V3, 512).errors] == ["bad_image"]
    picture(tmp_path / "later.png", (8, 8), 0)
    report = check_data(args, V3, 512)
    assert report.errors == [] and len(report.train[0]) == 1


def test_inspect_data_reads_images_next_to_the_jsonl(tmp_path, monkeypatch) -> None:
    """utils.inspect_data encodes a line as training does: relative image paths start at the JSONL
    file's folder, whatever the working directory."""
    from finetune.args import TrainArgs
    from utils.inspect_data import iter_samples

    sample, ref = image_sample(tmp_path / "data")
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [sample])
    monkeypatch.chdir(tmp_path)  # not the JSONL's folder
    args = TrainArgs(model_id_or_path=str(tmp_path / "model"), run_dir=str(tmp_path / "run"),
                     data=DataArgs(instruct_data=str(path)))
    [(_, _, line, _, ts)] = list(iter_samples(args, V3, use_eval=False, source_index=None))
    assert line == 1 and not isinstance(ts, DataFormatError), ts
    assert ts.tokens == reference(sample, ref, V3)[0] and len(ts.images) == 4
