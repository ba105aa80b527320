"""TRL's SFTTrainer fed by fastchat-ft: rows packed by ChatDataset (position_ids per conversation, assistant-only
labels) go in as they are, so TRL neither re-tokenizes, re-packs nor rebuilds the masks (assistant masks dropped
by packing are a reported TRL failure); fastchat_ft.patch swaps in the RMSNorm and LoRA kernels. TRL computes
the loss with its own fused LM head, from our labels.

    python examples/trl_sft.py                          # tiny random model, bundled demo data, CPU is fine
    python examples/trl_sft.py --model ~/models/Qwen2.5-0.5B-Instruct --data chats.jsonl --lora 16
"""
import datasets
from trl import SFTConfig, SFTTrainer

import fastchat_ft
from example_setup import KeepLosses, chat_dataset, device, load_tokenizer_and_model, maybe_lora, parse_args, write_report
from fastchat_ft.data.collate import collate


def main():
    args = parse_args(__doc__)
    tokenizer, model = load_tokenizer_and_model(args)
    packed = chat_dataset(args, tokenizer)
    # SFTTrainer takes a `datasets` Dataset; the packed rows become one row each, columns unchanged.
    dataset = datasets.Dataset.from_list([dict(row) for row in packed]).with_format("numpy")
    model = maybe_lora(model, args)
    handle = None if args.no_patch else fastchat_ft.patch(model)

    config = SFTConfig(
        output_dir=args.output or "runs/trl_sft", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, use_cpu=device().type == "cpu",
        bf16=device().type == "cuda",
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenized, masked and packed
        remove_unused_columns=False, max_length=None,
    )
    losses = KeepLosses()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=collate, callbacks=[losses])
    trainer.train()
    sample = collate([dataset[i] for i in range(min(2, len(dataset)))])
    write_report(args, "trl_sft", losses.losses, sample, handle)


if __name__ == "__main__":
    main()
