"""Tiny generative-VLM assets shared by test_vlm_commands.py and test_vlm_task.py (imported, not
collected): a Flickr8k-format folder of 4 synthetic images with one caption each, an
easy-VQA-format folder of the same images, a random ViT checkpoint (the frozen tower) and a
nano GPT decoder with a char tokenizer and a ChatML template."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
CAPTIONS = {"red": "a red square .", "green": "a green disc .", "blue": "blue sky", "yellow": "the yellow sun ."}
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!'\n0123456789"


def image(colour: str, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), COLOURS[colour])
    inv = tuple(255 - c for c in COLOURS[colour])
    for x in range(8, 24):  # a centred square of the complementary colour, so crops differ from flat colour
        for y in range(8, 24):
            im.putpixel((x, y), inv)
    return im


def char_decoder(folder: Path, chars: str = CHARS, block_size: int = 128) -> Path:
    """A nano-llama GPT with a char tokenizer over ``chars`` (+ ChatML specials), saved to ``folder``."""
    from polymodal.models.gpt import GPT, GPTConfig
    from polymodal.models.registry import save_model
    from polymodal.tokenizers import Tokenizer
    from polymodal.tokenizers.train import train_char_tokenizer

    base = train_char_tokenizer(chars, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"])
    tok = Tokenizer.from_tokenizers(base.backend, bos="<|im_start|>", eos="<|im_end|>", pad="<pad>",
                                    chat_template=CHATML, kind="char")
    gpt = GPT(GPTConfig.from_preset("nano-llama", vocab_size=tok.vocab_size, block_size=block_size,
                                    eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id))
    return save_model(gpt, folder, tok)


def make_assets(root: Path) -> Path:
    from polymodal.models.registry import save_model
    from polymodal.models.vit import ViT, ViTConfig

    fl = root / "flickr"
    (fl / "images").mkdir(parents=True)
    lines = []
    for c in COLOURS:
        image(c).save(fl / "images" / f"{c}.png")
        lines.append(f"{c}.png#0\t{CAPTIONS[c]}")
    (fl / "captions.txt").write_text("\n".join(lines) + "\n")
    (fl / "train.txt").write_text("\n".join(f"{c}.png" for c in COLOURS) + "\n")
    (fl / "val.txt").write_text("red.png\nblue.png\n")

    vqa = root / "easy_vqa"
    (vqa / "images").mkdir(parents=True)
    qs = []
    for i, c in enumerate(COLOURS):
        image(c).save(vqa / "images" / f"{i}.png")
        qs += [["what colour is it?", c, i], ["is it red?", "yes" if c == "red" else "no", i]]
    (vqa / "train_questions.json").write_text(json.dumps(qs))
    (vqa / "val_questions.json").write_text(json.dumps(qs[:4]))
    (vqa / "answers.txt").write_text("\n".join(list(COLOURS) + ["yes", "no"]) + "\n")

    torch.manual_seed(0)
    save_model(ViT(ViTConfig.from_preset("vit-nano-cifar", num_labels=0)), root / "vit")
    char_decoder(root / "gpt")
    return root
