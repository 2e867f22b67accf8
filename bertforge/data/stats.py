"""Corpus and instance statistics of a DATA folder, vectorised over the memory-mapped shards.

Instance figures are computed from the stored arrays (so they describe exactly what training will see);
corpus figures (documents, sentences, tokens, [UNK] rate, truncations) come from the counts `prepare` recorded
in the manifest, when it recorded them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bertforge.data.dataset import InstanceStore, PretrainData

HISTOGRAM_BINS = 8
# manifest count keys worth showing with the corpus figures, in display order (whichever prepare recorded)
_CORPUS_KEYS = ("files", "bytes_read", "replaced_bytes", "documents", "sentences", "tokens", "unk_tokens",
                "unk_rate", "empty_documents", "empty_sentences", "truncated_instances", "short_target_instances")
_PER_SPLIT_KEYS = {"instances", "masks", "is_random_next"}  # shown per split, computed from the shards


def corpus_stats(data: PretrainData) -> dict[str, Any]:
    """The corpus counts recorded by `prepare` (manifest `counts`, or `corpus`), numbers only."""
    recorded: dict[str, Any] = {}
    for key in ("corpus", "counts"):
        value = data.manifest.get(key)
        if isinstance(value, dict):
            recorded.update({k: v for k, v in value.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _PER_SPLIT_KEYS})
    if "unk_rate" not in recorded and recorded.get("tokens") and "unk_tokens" in recorded:
        recorded["unk_rate"] = recorded["unk_tokens"] / recorded["tokens"]
    known = [key for key in _CORPUS_KEYS if key in recorded]
    return {key: recorded[key] for key in known + sorted(set(recorded) - set(known))}


def split_stats(store: InstanceStore, *, max_seq_len: int, mask_id: int, unk_id: int, special: list[int],
                bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Instance statistics of one split: counts, IsNext share, lengths, masks, 80/10/10 split, [UNK] rate.

    Replacement shares are read off the stored ids: a random draw that hit the original id counts as "keep" and
    one that hit [MASK] as "mask" (a 1/vocab_size effect, as in the reference's own output).
    """
    lengths, random_next, mask_counts = [], [], []
    masked = replaced_mask = replaced_keep = tokens = unk = specials = 0
    for k in range(len(store.shards)):
        arrays = store.shard_arrays(k)
        lengths.append(np.diff(arrays["offsets"]))
        random_next.append(arrays["is_random_next"])
        mask_counts.append(np.diff(arrays["mask_offsets"]))
        replacements, originals = arrays["replacement_ids"], arrays["masked_ids"]
        is_mask = replacements == mask_id
        masked += len(replacements)
        replaced_mask += int(is_mask.sum())
        replaced_keep += int((~is_mask & (replacements == originals)).sum())
        tokens += len(arrays["tokens"])
        unk += int(np.count_nonzero(arrays["tokens"] == unk_id))
        specials += int(np.isin(arrays["tokens"], special).sum())
    n = len(store)
    if n == 0:
        return {"instances": 0}
    length = np.concatenate(lengths)
    masks = np.concatenate(mask_counts)
    width = max(1, -(-max_seq_len // bins))
    edges = list(range(0, max_seq_len, width)) + [max_seq_len + 1]
    counts, _ = np.histogram(length, bins=edges)
    return {
        "instances": n,
        "is_next_share": float(1.0 - np.concatenate(random_next).mean()),
        "tokens": tokens,
        "length": {"mean": float(length.mean()), "min": int(length.min()), "max": int(length.max())},
        "length_histogram": [{"from": lo, "to": hi - 1, "count": int(c)}
                             for lo, hi, c in zip(edges[:-1], edges[1:], counts)],
        "full_length_share": float((length == max_seq_len).mean()),
        "below_max_len_share": float((length < max_seq_len).mean()),
        "masks_per_instance": {"mean": float(masks.mean()), "min": int(masks.min()), "max": int(masks.max())},
        "masked_tokens": masked,
        "replacement_shares": {"mask": replaced_mask / masked if masked else 0.0,
                               "keep": replaced_keep / masked if masked else 0.0,
                               "random": (masked - replaced_mask - replaced_keep) / masked if masked else 0.0},
        "unk_rate": unk / (tokens - specials) if tokens > specials else 0.0,
    }


def data_stats(data: PretrainData, *, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Everything `bertforge inspect --stats` shows, as one JSON-ready dict."""
    ids = data.special_ids
    splits = {name: split_stats(data.split(name), max_seq_len=data.max_seq_len, mask_id=ids.mask, unk_id=ids.unk,
                                special=[ids.pad, ids.cls, ids.sep], bins=bins) for name in data.splits}
    corpus = corpus_stats(data)
    instances = sum(split["instances"] for split in splits.values())
    # the generator knows which chunks drew a short target; the stored lengths alone cannot tell them from
    # chunks cut short by a document's end (see below_max_len_share, an upper bound)
    short = corpus.get("short_target_instances")
    short_share = short / instances if short is not None and instances else None
    return {"data": str(data.path), "vocab_size": data.vocab_size, "max_seq_len": data.max_seq_len,
            "max_predictions": data.max_predictions, "short_seq_prob": data.option("short_seq_prob"),
            "short_target_share": short_share, "corpus": corpus, "splits": splits}


def format_stats(stats: dict[str, Any]) -> str:
    """A readable multi-line report of `data_stats`."""
    lines = [f"DATA {stats['data']}: vocab {stats['vocab_size']:,}, max_seq_len {stats['max_seq_len']}, "
             f"max_predictions {stats['max_predictions']}"]
    if stats["corpus"]:
        lines.append("corpus and generation (recorded by prepare):")
        for key, value in stats["corpus"].items():
            shown = f"{value:.4%}" if key.endswith("_rate") else f"{value:,}"
            lines.append(f"  {key.replace('_', ' '):<24}{shown}")
    if stats["short_target_share"] is not None:
        lines.append(f"short-target instances: {stats['short_target_share']:.1%} (recorded by prepare)")
    for name, split in stats["splits"].items():
        lines.append(f"{name}: {split['instances']:,} instances")
        if not split["instances"]:
            continue
        length, masks, shares = split["length"], split["masks_per_instance"], split["replacement_shares"]
        lines += [
            f"  IsNext share            {split['is_next_share']:.3f} (NotNext {1 - split['is_next_share']:.3f})",
            f"  tokens                  {split['tokens']:,} ([UNK] rate {split['unk_rate']:.4%} of non-special)",
            f"  length                  mean {length['mean']:.1f}, min {length['min']}, max {length['max']}; "
            f"{split['full_length_share']:.1%} at max_seq_len",
            f"  shorter than max        {split['below_max_len_share']:.1%} (short targets"
            + (f", drawn with p={stats['short_seq_prob']}" if stats["short_seq_prob"] is not None else "")
            + ", plus document ends)",
            f"  masks per instance      mean {masks['mean']:.2f}, min {masks['min']}, max {masks['max']}",
            f"  replacements            [MASK] {shares['mask']:.1%}, kept {shares['keep']:.1%}, "
            f"random {shares['random']:.1%} of {split['masked_tokens']:,}",
            "  length histogram:",
        ]
        peak = max(bin_["count"] for bin_ in split["length_histogram"]) or 1
        for bin_ in split["length_histogram"]:
            bar = "#" * round(40 * bin_["count"] / peak)
            lines.append(f"    {bin_['from']:>5}-{bin_['to']:<5} {bin_['count']:>10,}  {bar}")
    return "\n".join(lines)
