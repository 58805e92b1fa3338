"""reformat_data on image conversations: OpenAI-style exports become samples that encode exactly like the
same conversation written by hand in our format, the pictures stay the same bytes (also from an output
file in another folder), and what cannot be fixed offline is named with file:line and the fix."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.errors import DataFormatError
from finetune.data.tokenize import SampleType, encode_all
from tests.data_helpers import bundled_tekken_with_images, picture, write_jsonl
from utils import reformat_data

V3 = MistralTokenizer.from_file(str(bundled_tekken_with_images())).instruct_tokenizer  # has an image config
URL = "https://example.com/cat.png"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _user(content) -> dict:
    return {"role": "user", "content": content}


def _assistant(content) -> dict:
    return {"role": "assistant", "content": content}


def exports(data: Path) -> tuple[list[dict], list[dict]]:
    """Three exported image conversations, and each one as written by hand in our format."""
    red, blue = picture(data / "pics" / "red.png", (20, 30), 0), picture(data / "blue.png", (40, 17), 1)
    uri = "data:image/png;base64," + b64(red)
    chat_completions = {"messages": [
        _user([{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": uri, "detail": "high"}},
               {"type": "image_url", "image_url": {"url": "blue.png", "detail": "low"}}]),
        _assistant("Noise."),
    ]}
    responses = {"messages": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Compare"},
            {"type": "input_image", "image_url": "pics/red.png", "detail": "auto"},
            {"type": "input_image", "image_url": str(blue)}]},  # absolute: kept as it is
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Both noise.", "annotations": []}]},
    ]}
    anthropic = {"messages": [
        _user([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(red)}},
               {"type": "text", "text": "Colour?"}]),
        _assistant("Mixed."),
    ]}
    ours = [
        {"messages": [_user([{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": uri},
                             {"type": "image_url", "image_url": "blue.png"}]), _assistant("Noise.")]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      _user([{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": "pics/red.png"},
                             {"type": "image_url", "image_url": str(blue)}]),
                      _assistant("Both noise.")]},
        {"messages": [_user([{"type": "image_url", "image_url": uri}, {"type": "text", "text": "Colour?"}]),
                      _assistant("Mixed.")]},
    ]
    return [chat_completions, responses, anthropic], ours


def encode(sample: dict, base_dir: Path):
    [ts] = encode_all(sample, V3, SampleType.INSTRUCT, chunk=False, base_dir=base_dir)
    return ts


def image_refs(sample: dict) -> list[str]:
    return [c["image_url"] for m in sample["messages"] if isinstance(m["content"], list)
            for c in m["content"] if c["type"] == "image_url"]


def test_openai_image_exports_encode_like_our_format_from_another_folder(tmp_path, capsys) -> None:
    data, out_dir = tmp_path / "data", tmp_path / "elsewhere" / "out"
    rows, ours = exports(data)
    src = write_jsonl(data / "export.jsonl", rows)
    out = out_dir / "train.jsonl"
    out_dir.mkdir(parents=True)
    assert reformat_data.main([str(src), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{src}:1: message 0: 'detail' dropped (2), relative path rewritten for the output file's folder" in text
    assert (f"{src}:2: message 0: role developer -> system; message 0: input_text -> text, text parts -> one "
            "string; message 1: input_text -> text, input_image -> image_url (2), 'detail' dropped, relative path "
            "rewritten for the output file's folder; message 2: output_text -> text") in text
    assert f"{src}:3: message 0: base64 image source -> data: URI" in text
    assert "3 line(s), 3 changed, 0 skipped" in text
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for got, want in zip(written, ours, strict=True):
        a, b = encode(got, out_dir), encode(want, data)  # each from its own file's folder
        assert a.tokens == b.tokens and a.masks == b.masks
        assert len(a.images) == len(b.images) > 0
        for x, y in zip(a.images, b.images, strict=True):
            np.testing.assert_array_equal(x, y)
    # The pictures are the same bytes: data: URIs copied as they are, paths naming the same files.
    assert image_refs(written[0])[0] == image_refs(ours[0])[0] == image_refs(written[2])[0]
    moved = image_refs(written[1])
    assert moved[0] == "../../data/pics/red.png" and moved[1] == str(data / "blue.png")
    assert (out_dir / moved[0]).read_bytes() == (data / "pics" / "red.png").read_bytes()
    # The rewrite is needed: the hand-written line copied as it is does not find its picture from there.
    with pytest.raises(DataFormatError, match=r"pics/red\.png, which does not exist"):
        encode(ours[1], out_dir)
    # Reformatting the output changes nothing.
    again = out_dir / "again.jsonl"
    assert reformat_data.main([str(out), "--output", str(again)]) == 0
    assert "0 changed, 0 skipped" in capsys.readouterr().out
    assert again.read_bytes() == out.read_bytes()


def test_image_lines_already_in_our_format_stay_byte_for_byte(tmp_path, capsys) -> None:
    _, ours = exports(tmp_path)
    raw = json.dumps(ours[1], indent=None, separators=(",", ":"))  # not how reformat_data writes JSON
    text_row = {"messages": [_user("hi"), _assistant("hello")], "images": [], "image": None}  # an image column
    src = write_jsonl(tmp_path / "ours.jsonl", [raw, ours[0], text_row])
    before = src.read_bytes()
    assert reformat_data.main([str(src), "--in-place"]) == 0
    assert "3 line(s), 0 changed, 0 skipped" in capsys.readouterr().out
    assert src.read_bytes() == before
    # Into a subfolder, only the relative paths change, and they still name the same files.
    sub = tmp_path / "sub" / "train.jsonl"
    assert reformat_data.main([str(src), "--output", str(sub)]) == 1
    assert f"the output folder {sub.parent} does not exist; create it first" in capsys.readouterr().err
    sub.parent.mkdir()
    assert reformat_data.main([str(src), "--output", str(sub)]) == 0
    assert "3 line(s), 2 changed" in capsys.readouterr().out
    first = json.loads(sub.read_text().splitlines()[0])
    assert image_refs(first)[0] == "../pics/red.png"
    assert encode(first, sub.parent).tokens == encode(ours[1], tmp_path).tokens


def test_llava_and_llama_factory_rows_get_their_pictures_at_the_placeholders(tmp_path, capsys) -> None:
    """Training does not read a top-level 'image'/'images': without the conversion the pictures would be lost."""
    data = tmp_path / "data"
    red, blue = picture(data / "coco" / "1.png", (20, 30), 0), picture(data / "2.png", (40, 17), 1)
    llava = {"id": "x1", "image": "coco/1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    factory = {"messages": [_user("Compare <image> with <image>"), _assistant("Both noise.")],
               "images": ["coco/1.png", str(blue)]}
    no_tag = {"messages": [_user("Describe."), _assistant("Noise.")], "images": ["2.png"]}
    ours = [
        {"id": "x1", "messages": [_user([{"type": "image_url", "image_url": "coco/1.png"},
                                         {"type": "text", "text": "What is this?"}]),
                                  _assistant("Noise."), _user("Sure?"), _assistant("Yes.")]},
        {"messages": [_user([{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": "coco/1.png"},
                             {"type": "text", "text": "with"}, {"type": "image_url", "image_url": str(blue)}]),
                      _assistant("Both noise.")]},
        {"messages": [_user([{"type": "image_url", "image_url": "2.png"}, {"type": "text", "text": "Describe."}]),
                      _assistant("Noise.")]},
    ]
    src = write_jsonl(data / "llava.jsonl", [llava, factory, no_tag])
    out = tmp_path / "out" / "train.jsonl"
    out.parent.mkdir()
    assert reformat_data.main([str(src), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert (f"{src}:1: ShareGPT 'conversations' -> 'messages'; 4 ShareGPT turn(s) ('from'/'value') -> messages; "
            "'image' (1) -> image chunks at the <image> placeholders; relative path rewritten") in text
    assert f"{src}:3: 'images' (1) -> image chunks before the first user text (no <image> placeholder)" in text
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("image" not in row and "images" not in row for row in written)
    for got, want in zip(written, ours, strict=True):
        a, b = encode(got, out.parent), encode(want, data)
        assert a.tokens == b.tokens and len(a.images) == len(b.images) > 0
        for x, y in zip(a.images, b.images, strict=True):
            np.testing.assert_array_equal(x, y)
    assert (out.parent / image_refs(written[0])[0]).read_bytes() == red.read_bytes()


@pytest.mark.parametrize("row, match", [
    ({"messages": [_user("<image> and <image>"), _assistant("a")], "images": ["a.png"]},
     r"'images' lists 1 picture\(s\) but the user messages have 2 <image> placeholder\(s\); make them match"),
    ({"messages": [_user("x"), _assistant("see <image>")], "image": "a.png"},
     r"message 1 \(assistant\) has an <image> placeholder"),
    ({"messages": [_user("<image>"), _assistant("a")], "images": [URL]},
     r"'images' entry 0 is the URL"),
    ({"messages": [_user("<image>"), _assistant("a")], "image": "a.png", "images": ["a.png"]},
     r"has both 'image' and 'images'"),
])
def test_placeholder_rows_that_do_not_add_up_are_skipped(row: dict, match: str) -> None:
    with pytest.raises(reformat_data.Skip, match=match):
        reformat_data.reformat_sample(row, random.Random(0))


UNFIXABLE = [
    (_user([{"type": "image_url", "image_url": {"url": URL, "detail": "high"}}]),
     r"message 0 \(user\) chunk 0 is the URL 'https://example\.com/cat\.png'; training never downloads images: "
     r"save the picture next to the JSONL file and write its relative path .*then run reformat_data again"),
    (_user([{"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": "HTTP://example.com/a.jpg"}]),
     r"chunk 1 is the URL 'HTTP://example\.com/a\.jpg'"),
    (_user([{"type": "image", "source": {"type": "url", "url": URL}}]), r"chunk 0 is the URL"),
    (_user([{"type": "input_image", "file_id": "file-abc"}]),
     r"chunk 0 is the OpenAI file 'file-abc', which cannot be read offline; download it"),
]
MISPLACED = [
    ({"role": "system", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": "a.png"}]},
     r"message 0 \(system\) chunk 1 is an image, but the model sees pictures only in user messages; move it into "
     r"the first user message"),
    (_assistant([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
     r"message 1 \(assistant\) chunk 0 is an image.*not trained to write pictures"),
]


@pytest.mark.parametrize("message, match", UNFIXABLE + MISPLACED)
def test_unfixable_images_skip_the_line_naming_the_fix(message: dict, match: str) -> None:
    messages = [message, _assistant("ok")] if message["role"] != "assistant" else [_user("hi"), message]
    if message["role"] == "system":
        messages.insert(1, _user("hi"))
    with pytest.raises(reformat_data.Skip, match=match):
        reformat_data.reformat_sample({"messages": messages}, random.Random(0))


def test_unfixable_image_lines_are_reported_by_file_and_line(tmp_path, capsys) -> None:
    rows = [{"messages": [m, _assistant("ok")]} for m, _ in UNFIXABLE]
    rows.insert(2, {"messages": [_user("text only"), _assistant("kept")]})
    tool = {"role": "tool", "tool_call_id": "aB3dE5gH7", "content": [{"type": "input_image", "image_url": "a.png"}]}
    rows.append({"messages": [_user("x"), {"role": "assistant", "tool_calls": [
        {"id": "aB3dE5gH7", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, tool, _assistant("y")]})
    src = write_jsonl(tmp_path / "urls.jsonl", rows)
    assert reformat_data.main([str(src)]) == 0
    text = capsys.readouterr().out
    for n in (1, 2, 4, 5):
        assert f"{src}:{n}: skipped: message 0 (user) chunk" in text
    assert f"{src}:6: skipped: message 2 (tool) chunk 0 is an image" in text
    assert "3 line(s) skipped for images named by http(s) URL: download each picture, write its path relative " \
           "to urls.jsonl (or a data: URI) and run reformat_data again." in text
    assert "1 line(s), 0 changed, 5 skipped" in text
    assert json.loads((tmp_path / "urls.reformatted.jsonl").read_text())["messages"][1] == _assistant("kept")
