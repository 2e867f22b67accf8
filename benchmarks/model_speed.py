"""Model-only speed: forward + backward of our BertForPreTraining vs `transformers.BertForPreTraining`.

Isolates what the model code buys (no optimizer, no data loading; `benchmarks/pretrain_throughput.py` times the
whole training step). Variants, all on the same random batches (seq <= 128, 15% of real tokens masked, at most
20 per sequence, a tenth of the sequences shorter than the longest as in BERT's data) and identical weights:

- `transformers`: its stock model, `attn_implementation="sdpa"`, labels -100 at unmasked positions, its loss;
- `ours, full head`: our model with the MLM head over every position (what transformers does), same loss;
- `ours, masked-only`: the MLM head only at the masked positions (what `bertforge pretrain` runs).

Timed runs alternate between variants after warm-up (this machine's speed drifts between runs); the median is
reported as non-padding tokens per second, with each variant's ratio to transformers. Also checks that every
variant computes the same MLM and NSP losses (within 1e-5, fp32).

    python benchmarks/model_speed.py                 # mini, batch 32, seq 128, 3 runs of 3 steps
    python benchmarks/model_speed.py --size tiny --runs 1 --steps 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bertforge.config import ModelConfig
from bertforge.heads import BertForPreTraining


def make_batch(config: ModelConfig, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
    """Random instances shaped like BERT's: most full length, a tenth shorter; 15% masked, <= 20 per sequence."""
    lengths = torch.full((batch_size,), seq_len)
    short = torch.rand(batch_size, generator=generator) < 0.1
    lengths[short] = torch.randint(16, seq_len, (int(short.sum()),), generator=generator)
    input_ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(seq_len)[None, :] >= lengths[:, None] // 2).long() * attention_mask
    predictions = min(20, round(0.15 * seq_len))
    positions = torch.zeros(batch_size, predictions, dtype=torch.long)
    labels = torch.full((batch_size, predictions), -100)
    for row, length in enumerate(lengths.tolist()):
        count = min(predictions, max(1, round(0.15 * (length - 3))))
        chosen = torch.randperm(length - 2, generator=generator)[:count].sort().values + 1
        positions[row, :count] = chosen
        labels[row, :count] = input_ids[row, chosen]
    full_labels = torch.full((batch_size, seq_len), -100)
    full_labels.scatter_(1, positions, labels)  # padded slots write -100 onto position 0 ([CLS]): no label
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "masked_lm_positions": positions, "masked_lm_labels": labels, "full_labels": full_labels,
            "next_sentence_label": torch.randint(0, 2, (batch_size,), generator=generator)}


def ours_loss(model: BertForPreTraining, batch: dict, masked_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    if masked_only:
        out = model(*inputs, batch["masked_lm_positions"], batch["masked_lm_labels"])  # (M, V)
        labels = batch["masked_lm_labels"][batch["masked_lm_labels"] != -100]
    else:
        out = model(*inputs)  # (B, T, V)
        labels = batch["full_labels"]
    mlm = F.cross_entropy(out.mlm_logits.reshape(-1, out.mlm_logits.shape[-1]), labels.reshape(-1))
    return mlm, F.cross_entropy(out.nsp_logits, batch["next_sentence_label"])


def hf_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"])
    vocab = out.prediction_logits.shape[-1]
    mlm = F.cross_entropy(out.prediction_logits.reshape(-1, vocab), batch["full_labels"].reshape(-1))
    return mlm, F.cross_entropy(out.seq_relationship_logits, batch["next_sentence_label"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward steps per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from bertforge.hf import config_to_hf, hf_state_dict

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ModelConfig.preset(args.size, vocab_size=30522)
    ours = BertForPreTraining(config).to(device).train()
    hf_config = transformers.BertConfig(**config_to_hf(config, "BertForPreTraining"))
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.BertForPreTraining(hf_config).to(device).train()
    theirs.load_state_dict(hf_state_dict(ours), strict=False)  # the decoder is tied to the word embeddings
    generator = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in make_batch(config, args.batch_size, args.seq_len, generator).items()}
               for _ in range(args.steps)]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)

    variants = {
        "transformers (sdpa)": lambda batch: hf_loss(theirs, batch),
        "ours, full head": lambda batch: ours_loss(ours, batch, masked_only=False),
        "ours, masked-only": lambda batch: ours_loss(ours, batch, masked_only=True),
    }
    ours.eval(), theirs.eval()
    with torch.no_grad():
        reference = [float(x) for x in variants["transformers (sdpa)"](batches[0])]
        for name, loss_fn in variants.items():
            got = [float(x) for x in loss_fn(batches[0])]
            ok = all(abs(a - b) < 1e-5 for a, b in zip(got, reference))
            print(f"parity {name:22} mlm {got[0]:.6f} nsp {got[1]:.6f}  {'ok' if ok else 'MISMATCH'}")
    ours.train(), theirs.train()

    def run(loss_fn) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            mlm, nsp = loss_fn(batch)
            (mlm + nsp).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)

    for loss_fn in variants.values():  # warm-up
        run(loss_fn)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, loss_fn in variants.items():
            rates[name].append(run(loss_fn))
            ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    print(f"\n{args.size}, batch {args.batch_size}, seq {args.seq_len}, {device}, {torch.get_num_threads()} threads; "
          f"median of {args.runs} runs x {args.steps} steps, non-padding tokens per wall second and per CPU second "
          "(the CPU figure is steadier on a shared machine)")
    peer_wall = statistics.median(wall for wall, _ in rates["transformers (sdpa)"])
    peer_cpu = statistics.median(cpu for _, cpu in rates["transformers (sdpa)"])
    for name, values in rates.items():
        wall = statistics.median(value for value, _ in values)
        cpu = statistics.median(value for _, value in values)
        print(f"  {name:22} {wall:9,.0f} tokens/s  x{wall / peer_wall:.2f}   {cpu:9,.0f} tokens/CPU-s  "
              f"x{cpu / peer_cpu:.2f}   wall runs: " + ", ".join(f"{value:,.0f}" for value, _ in values))


if __name__ == "__main__":
    main()
