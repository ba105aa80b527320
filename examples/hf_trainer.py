"""HF Trainer with fastchat-ft's data and kernels: ChatDataset packs conversations into rows with position_ids
restarting per conversation and assistant-only labels; fastchat_ft.patch swaps in the fused kernels.

    python examples/hf_trainer.py                      # tiny random model, bundled demo data, CPU is fine
    python examples/hf_trainer.py --model ~/models/SmolLM2-135M-Instruct --data chats.jsonl --lora 16
"""
from transformers import Trainer, TrainingArguments

import fastchat_ft
from example_setup import KeepLosses, chat_dataset, device, load_tokenizer_and_model, maybe_lora, parse_args, write_report
from fastchat_ft.data.collate import collate


def main():
    args = parse_args(__doc__)
    tokenizer, model = load_tokenizer_and_model(args)
    dataset = chat_dataset(args, tokenizer)
    model = maybe_lora(model, args)
    handle = None if args.no_patch else fastchat_ft.patch(model)  # after peft, so LoRA layers are found

    training_args = TrainingArguments(
        output_dir=args.output or "runs/hf_trainer", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, use_cpu=device().type == "cpu",
        bf16=device().type == "cuda",
        # Our rows are already tokenized and packed: keep every column (position_ids above all) for the collate.
        remove_unused_columns=False,
    )
    losses = KeepLosses()
    # collate pads rows and never adds an attention_mask, so HF builds the per-conversation mask from position_ids.
    # Trainer passes num_items_in_batch (label tokens of the whole accumulated step) to the patched loss.
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                      callbacks=[losses])
    trainer.train()
    sample = collate([dataset[i] for i in range(min(2, len(dataset)))])
    write_report(args, "hf_trainer", losses.losses, sample, handle)


if __name__ == "__main__":
    main()
