"""A plain PyTorch loop on fastchat-ft's data and kernels: ChatDataset + collate in a DataLoader, a patched HF
model, and gradient accumulation normalised the way HF's num_items_in_batch does it (each micro-batch's
summed loss divided by the label tokens of the whole optimizer step, so the split does not change the loss).

    python examples/plain_pytorch.py                    # tiny random model, bundled demo data, CPU is fine
    python examples/plain_pytorch.py --model ~/models/SmolLM2-135M-Instruct --data chats.jsonl --lora 16
"""
import itertools

import torch
from torch.utils.data import DataLoader

import fastchat_ft
from example_setup import chat_dataset, device, load_tokenizer_and_model, maybe_lora, parse_args, write_report
from fastchat_ft.data.collate import collate

MODEL_INPUTS = ("input_ids", "labels", "position_ids")  # no attention_mask: HF masks per document from these


def main():
    args = parse_args(__doc__)
    tokenizer, model = load_tokenizer_and_model(args)
    dataset = chat_dataset(args, tokenizer)
    model = maybe_lora(model, args).to(device())
    handle = None if args.no_patch else fastchat_ft.patch(model)

    def epochs():
        for epoch in itertools.count():
            dataset.set_epoch(epoch)  # a fresh, deterministic order of the packed rows each epoch
            yield from DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate)

    batches = epochs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, first_batch = [], None
    for step in range(args.steps):
        micro = [next(batches) for _ in range(args.grad_accum)]
        first_batch = first_batch or micro[0]
        # HF's rule: labels shift by one, so position t predicts labels[t + 1]; count the step's label tokens once.
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_loss = 0.0
        for b in micro:
            inputs = {k: b[k].to(device()) for k in MODEL_INPUTS}
            # use_cache=False: a KV cache would turn off HF's per-document mask for packed rows.
            loss = model(**inputs, num_items_in_batch=n_items, use_cache=False).loss
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        print(f"step {step + 1}/{args.steps}  loss {step_loss:.4f}  label tokens {n_items}")
    write_report(args, "plain_pytorch", losses, first_batch, handle)


if __name__ == "__main__":
    main()
