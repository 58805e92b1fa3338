"""Fine-tune a small multimodal model on pictures end to end on this machine, with no downloads.

    python -m utils.quickstart_vision [--workdir quickstart_vision_run] [--max_steps 200]

The image counterpart of ``utils.quickstart``, with the same tools you will use on a real model:
  1. creates a small Pixtral-style model (seeded random weights for the language model, the vision
     encoder and its adapter; mistral-common's real Tekken tokenizer file with its image config) in
     the native folder layout: params.json, consolidated.safetensors, tekken.json;
  2. draws pictures with a checkable answer: one shape (disc, square or triangle) of a colour (red,
     green, blue or yellow, each channel jittered) at a random place and size on a grey background,
     asked "What colour is the shape?"; train.jsonl and a held-out eval.jsonl whose pictures never
     occur in training (``pics/``, paths relative to the JSONL files);
  3. runs ``python -m utils.validate_data`` on the config it wrote;
  4. measures held-out accuracy of the untrained model: is the colour name (of four) whose answer has
     the highest log-likelihood the right one? Chance is 25%: every sample asks the same question and
     the eval set is balanced, so above chance means the answer comes from the picture. Also greedy
     exact match over the whole vocabulary (what generation would write);
  5. trains LoRA adapters on the language model (default targets) with ``torchrun train.py``;
  6. measures both again with the trained adapters.

Why this task is learnable here: the encoder and its adapter stay frozen and random, but a random
patch convolution followed by near-identity residual layers keeps a patch's colour as a direction of
its features, so the features of the shape's patches differ by colour. The adapters must learn to find those
patches among the background ones (attention) and to map their features onto the frozen, random
output rows of the four colour names. Colour jitter, positions, sizes and shapes vary, so the eval
pictures are new: the adapters cannot memorise them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from finetune.checkpointing import checkpoint_dir
from utils import quickstart
from utils.quickstart import fresh_workdir, launch_processes, run_command, write_config

REPO = Path(__file__).resolve().parents[1]
TIME_CLAIM = "1-2 minutes on 2 CPU cores"  # measured in docs/benchmarks.md
COLOURS = {"red": (215, 40, 40), "green": (40, 180, 40), "blue": (40, 60, 215), "yellow": (225, 210, 40)}
SHAPES = ("disc", "square", "triangle")
QUESTION = "What colour is the shape?"


def tokenizer_file() -> Path:
    """mistral-common's bundled Tekken file with an image config (patch 16, max size 1024, no merge)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def create_model(folder: Path, dim: int, n_layers: int, seed: int, std: float) -> None:
    """A seeded random multimodal model (Pixtral 12B's layout: no patch merger) with the real tokenizer.

    ``std`` is the weights' standard deviation. With the usual 0.02 the frozen random encoder, adapter and
    output layer pass too faint a signal: 200 steps taught the model to answer a colour name, always the
    same one (held-out accuracy at chance)."""
    from model.checkpoint import save_model_folder
    from model.configs import params_from_args
    from model.tiny import tiny_vision_args
    from model.transformer import Transformer

    head_dim = 16
    args = tiny_vision_args(
        merge=1, vocab_size=131072, dim=dim, n_layers=n_layers, head_dim=head_dim,
        n_heads=dim // head_dim, n_kv_heads=max(1, dim // head_dim // 2), hidden_dim=2 * dim,
    )
    model = Transformer(args, vision=True)
    model.init_weights(seed, std=std)
    save_model_folder(folder, params_from_args(args), model.state_dict())
    shutil.copy2(tokenizer_file(), folder / "tekken.json")


def draw(rng: random.Random, colour: str, size: int):
    """One picture: a shape of ``colour`` (jittered) at a random place and size on a jittered grey."""
    import numpy as np
    from PIL import Image, ImageDraw

    grey = rng.randint(150, 235)
    pixels = np.full((size, size, 3), grey, dtype=np.int16)
    pixels += np.array([rng.randint(-8, 8) for _ in range(size * size * 3)], dtype=np.int16).reshape(pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    side = rng.randint(size // 3, 2 * size // 3)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    shape = rng.choice(SHAPES)
    pen = ImageDraw.Draw(image)
    if shape == "disc":
        pen.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        pen.polygon([(x, y + side), (x + side, y + side), (x + side / 2, y)], fill=fill)
    return image


def picture_digest(path: Path) -> str:
    """The pixels' hash (not the file's: PNG bytes could differ for equal pictures)."""
    from PIL import Image

    with Image.open(path) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def write_data(folder: Path, n_train: int, n_eval: int, size: int, seed: int) -> tuple[Path, Path]:
    """Train and eval files; each set cycles through the colours (the eval set is balanced, so a model
    that always answers the same colour scores exactly chance) and no eval picture equals a train one."""
    rng = random.Random(seed)
    (folder / "pics").mkdir(parents=True)
    seen: set[str] = set()
    out = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        names = list(COLOURS)
        lines = []
        for i in range(n):
            colour = names[i % len(names)]
            rel = f"pics/{split}_{i:05d}.png"
            while True:
                image = draw(rng, colour, size)
                digest = hashlib.sha256(image.tobytes()).hexdigest()  # RGB: what picture_digest reads back
                if digest not in seen:
                    seen.add(digest)
                    break
            image.save(folder / rel)
            user = [{"type": "image_url", "image_url": rel}, {"type": "text", "text": QUESTION}]
            lines.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": colour}]})
        rng.shuffle(lines)
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        out.append(path)
    return out[0], out[1]


def load_for_eval(model_folder: Path, adapter: Path | None, rank: int):
    """``utils.quickstart``'s loader, with the vision encoder."""
    return quickstart.load_for_eval(model_folder, adapter, rank, vision=True)


def score(model, tokenizer, sample: dict, base_dir: Path) -> tuple[list[float], bool]:
    """(log-likelihood of each colour name as the answer, in ``COLOURS`` order; whether greedy decoding
    writes the expected answer exactly).

    A candidate's log-likelihood sums its tokens and the end of the turn (what training targets). The
    candidates go through the model as one packed row. Greedy decoding reproduces an answer exactly if and
    only if, fed that answer, the model's argmax at every target position is the next answer token: so
    the expected candidate's row measures what ``utils.generate`` would print, over the whole vocabulary.
    """
    from finetune.data.tokenize import SampleType, encode_all

    device = next(model.parameters()).device
    tokens, targets, images, seqlens = [], [], [], []
    for name in COLOURS:
        candidate = {"messages": [sample["messages"][0], {"role": "assistant", "content": name}]}
        (encoded,) = encode_all(candidate, tokenizer.instruct_tokenizer, SampleType.INSTRUCT, chunk=False,
                                base_dir=base_dir)
        tokens += encoded.tokens
        targets += encoded.masks[1:] + [False]  # position t predicts token t + 1; none after the last
        images += [torch.as_tensor(im, dtype=torch.float32, device=device) for im in encoded.images]
        seqlens.append(len(encoded.tokens))
    x = torch.tensor(tokens, device=device)
    with torch.no_grad():
        # Logits only where an answer token is predicted: the output layer has 131072 rows.
        where = torch.tensor(targets, device=device).nonzero()[:, 0]  # (answer tokens,)
        hidden = model.hidden_states(x, seqlens, images)[where]  # (answer tokens, dim)
        logp = torch.log_softmax(model.output(hidden).float(), dim=-1)  # (answer tokens, vocab)
        hits = logp.argmax(-1) == x[where + 1]  # (answer tokens,)
        logp = logp.gather(1, x[where + 1, None])[:, 0]  # (answer tokens,)
        owner = torch.bucketize(where, torch.tensor(seqlens, device=device).cumsum(0), right=True)
        scores = torch.zeros(len(COLOURS), device=device).index_add_(0, owner, logp).tolist()
        expected = list(COLOURS).index(sample["messages"][1]["content"])
        return scores, bool(hits[owner == expected].all())


def accuracy(model, tokenizer, eval_file: Path) -> tuple[float, float, list[tuple[str, str, str]]]:
    """Held-out (choice accuracy: is the colour name of highest log-likelihood the right one?, greedy
    exact match, [(picture, expected, chosen)])."""
    names = list(COLOURS)
    results, greedy = [], 0
    for line in eval_file.read_text().splitlines():
        sample = json.loads(line)
        scores, exact = score(model, tokenizer, sample, eval_file.parent)
        chosen = names[max(range(len(names)), key=scores.__getitem__)]
        results.append((sample["messages"][0]["content"][0]["image_url"], sample["messages"][1]["content"], chosen))
        greedy += exact
    return sum(e == c for _, e, c in results) / len(results), greedy / len(results), results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m utils.quickstart_vision", description=f"{__doc__.splitlines()[0]} It takes {TIME_CLAIM}."
    )
    parser.add_argument("--workdir", default="quickstart_vision_run", help="where the model, data and run go (replaced)")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--init_std", type=float, default=0.1, help="standard deviation of the random weights")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=48, help="pictures are this many pixels square")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    nproc, threads, why = launch_processes()  # before this run adds to the load
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    workdir = fresh_workdir(opts.workdir, "quickstart_vision.yaml")
    print(f"[1/6] model: dim {opts.dim}, {opts.n_layers} layers, 2-layer vision encoder, vocab 131072 "
          f"(tekken_240911.json) -> {workdir / 'model'}")
    create_model(workdir / "model", opts.dim, opts.n_layers, opts.seed, opts.init_std)
    train, eval_ = write_data(workdir, opts.n_train, opts.n_eval, opts.image_size, opts.seed)
    print(f"[2/6] data: {opts.n_train} training and {opts.n_eval} held-out {opts.image_size}x{opts.image_size} "
          f"pictures, e.g. {train.read_text().splitlines()[0]}")
    config = workdir / "quickstart_vision.yaml"
    write_config(config, workdir, train, eval_, opts, nproc)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    print("[3/6] validating the data")
    run_command([sys.executable, "-m", "utils.validate_data", "--train_yaml", str(config)], env)

    tokenizer = MistralTokenizer.from_file(str(workdir / "model" / "tekken.json"))
    torch.set_num_threads(max(1, threads * nproc))
    chance = 1 / len(COLOURS)
    before, greedy_before, _ = accuracy(load_for_eval(workdir / "model", None, opts.rank), tokenizer, eval_)
    print(f"[4/6] held-out accuracy before fine-tuning: {before:.1%} (chance: {chance:.0%}); "
          f"greedy exact match {greedy_before:.1%}")

    print(f"[5/6] training LoRA adapters: {nproc} process(es) x {threads} thread(s) ({why})")
    t0 = time.perf_counter()
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                 "train.py", str(config)], env)
    train_seconds = time.perf_counter() - t0

    adapter = checkpoint_dir(workdir / "run", opts.max_steps) / "consolidated" / "lora.safetensors"
    after, greedy_after, samples = accuracy(load_for_eval(workdir / "model", adapter, opts.rank), tokenizer, eval_)
    print(f"[6/6] held-out accuracy after fine-tuning: {after:.1%} (before: {before:.1%}, chance: {chance:.0%}); "
          f"greedy exact match {greedy_after:.1%} (before: {greedy_before:.1%})")
    for picture, expected, got in samples[:5]:
        print(f"    {picture:>22} -> {got:<7} {'ok' if got == expected else 'expected ' + expected}")
    total = time.perf_counter() - start
    example = sorted((workdir / "pics").glob("eval_*.png"))[0]
    print(f"Done in {total:.0f} s (training {train_seconds:.0f} s). Try the adapter yourself:\n"
          f"  python -m utils.generate --model {workdir / 'model'} --lora {adapter} --image {example} "
          f"--prompt '{QUESTION}' --max_new_tokens 3")
    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "chance": chance,
        "greedy_before": greedy_before,
        "greedy_after": greedy_after,
        "seconds": total,
        "train_seconds": train_seconds,
        "processes": nproc,
        "threads": threads,
    }
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
