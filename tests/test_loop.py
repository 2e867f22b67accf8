"""The training loop and the pre-training loss: data order, normalisation, micro-batch invariance, NaN handling."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bertforge import checkpoint
from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.heads import BertForPreTraining
from bertforge.loop import LoopConfig, StepLoader, _step_totals, train
from bertforge.optim import linear_schedule
from bertforge.precision import resolve_precision
from bertforge.pretrain import count_targets, pretraining_loss


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i}

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def _indices(batch: dict) -> list[int]:
    return batch["index"].tolist()


def _collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([item["index"] for item in items])}


def test_step_loader_visits_a_seeded_permutation_per_epoch_and_straddles_epochs():
    data = _Items(10)
    loader = StepLoader(data, _collate, batch_size=2, grad_accum=2, seed=3)
    seen = [i for _ in range(5) for mb in loader.next_step() for i in _indices(mb)]  # 20 instances = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh order each epoch
    assert data.epochs == [0, 1]
    assert loader.state_dict() == {"instances": 20, "epoch": 2}
    again = StepLoader(_Items(10), _collate, batch_size=2, grad_accum=2, seed=3)
    assert [i for _ in range(5) for mb in again.next_step() for i in _indices(mb)] == seen  # seeded
    other = StepLoader(_Items(10), _collate, batch_size=2, grad_accum=2, seed=4)
    assert [i for _ in range(5) for mb in other.next_step() for i in _indices(mb)] != seen


def test_step_loader_resumes_at_the_exact_next_instance_whatever_the_batch_shape():
    reference = StepLoader(_Items(7), _collate, batch_size=3, seed=0)
    stream = [i for _ in range(6) for mb in reference.next_step() for i in _indices(mb)]
    resumed = StepLoader(_Items(7), _collate, batch_size=2, grad_accum=3, seed=0)
    resumed.load_state_dict({"instances": 6})
    assert [i for mb in resumed.next_step() for i in _indices(mb)] == stream[6:12]
    assert [len(_indices(mb)) for mb in resumed.next_step()] == [2, 2, 2]


def _tiny(dropout: float = 0.0) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(ModelConfig.preset("tiny", vocab_size=40, max_position_embeddings=32,
                                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def _batch(seed: int, size: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """A collate_pretrain-shaped batch with padding and a varying number of masks per row."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 40, (size, length), generator=g)
    attention_mask = torch.ones(size, length, dtype=torch.int64)
    attention_mask[::2, -3:] = 0
    input_ids[attention_mask == 0] = 0
    positions = torch.zeros(size, 3, dtype=torch.int64)
    labels = torch.full((size, 3), -100, dtype=torch.int64)
    for b in range(size):
        count = 1 + b % 3
        positions[b, :count] = torch.randperm(length - 3, generator=g)[:count] + 1
        labels[b, :count] = torch.randint(5, 40, (count,), generator=g)
    token_type_ids = (torch.arange(length) >= length // 2).long().expand(size, -1).clone()
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "masked_lm_positions": positions, "masked_lm_labels": labels,
            "next_sentence_label": torch.randint(0, 2, (size,), generator=g)}


def test_loss_is_the_sum_of_the_two_cross_entropies():
    model = _tiny().eval()
    batch = _batch(1)
    totals = _step_totals([batch], count_targets, torch.device("cpu"))
    loss, stats = pretraining_loss(model, batch, totals)
    # by hand: logits at every position, pick the masked ones, mean CE; NSP mean CE
    output = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    rows, targets = [], []
    for b in range(4):
        for p, label in zip(batch["masked_lm_positions"][b], batch["masked_lm_labels"][b]):
            if label != -100:
                rows.append(output.mlm_logits[b, p])
                targets.append(label)
    mlm = F.cross_entropy(torch.stack(rows), torch.stack(targets))
    nsp = F.cross_entropy(output.nsp_logits, batch["next_sentence_label"])
    assert len(targets) == 1 + 2 + 3 + 1
    torch.testing.assert_close(loss, mlm + nsp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["mlm_loss"], mlm, rtol=1e-6, atol=1e-6)
    assert int(stats["mlm_count"]) == 7 and int(stats["nsp_count"]) == 4
    assert int(stats["tokens"]) == int(batch["attention_mask"].sum())


def _step_gradients(batches: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _tiny()
    totals = _step_totals(batches, count_targets, torch.device("cpu"))
    total = torch.zeros(())
    for micro in batches:
        loss, _ = pretraining_loss(model, micro, totals)
        loss.backward()
        total += loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_splitting_a_batch_into_micro_batches_changes_neither_loss_nor_gradients():
    whole = _batch(2, size=8)
    halves = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
    masks = [int((half["masked_lm_labels"] != -100).sum()) for half in halves]
    assert masks == [7, 8]  # unequal: a per-micro-batch mean would weight the halves' positions differently
    loss_whole, grads_whole = _step_gradients([whole])
    loss_split, grads_split = _step_gradients(halves)
    torch.testing.assert_close(loss_split, loss_whole, rtol=1e-6, atol=1e-6)
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class _Toy(torch.utils.data.Dataset):
    """Regression instances; `poison` indices carry a NaN target."""

    def __init__(self, n: int, poison: set[int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        for i in poison:
            self.y[i] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _toy_collate(items: list[dict]) -> dict:
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


class _Log:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)

    def update(self, step: int, postfix: dict) -> None:
        pass


def _toy_run(tmp_path, poison: set[int], *, steps: int, on_nan: str = "stop", save_every: int | None = None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = linear_schedule(optimizer, warmup_steps=0, total_steps=steps)
    loader = StepLoader(_Toy(40, poison), _toy_collate, batch_size=1, seed=0)
    log = _Log()

    def loss_fn(m, batch, totals):
        loss = ((m(batch["x"]) - batch["y"]) ** 2).sum() / totals["n"]
        return loss, {}

    result = train(model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                   count_fn=lambda b: {"n": float(len(b["x"]))}, loss_fn=loss_fn, metrics_fn=lambda s, n: {},
                   evaluate_fn=None, monitor=log, run_dir=tmp_path,
                   config=LoopConfig(max_steps=steps, log_every=1, save_every=save_every, on_nan=on_nan,
                                     max_bad_steps=3), device=torch.device("cpu"))
    return model, result, log.records, loader


def _order(n: int = 40) -> list[int]:
    loader = StepLoader(_Toy(n, set()), _toy_collate, batch_size=1, seed=0)
    return [loader._index(p) for p in range(n)]


def test_a_non_finite_step_is_skipped_and_reported(tmp_path):
    order = _order()
    model, result, records, _ = _toy_run(tmp_path, {order[3]}, steps=6)
    events = [r for r in records if r.get("event") == "nonfinite_loss"]
    assert [e["step"] for e in events] == [4] and result.skipped_steps == 1
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 5, 6]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.step == 6 and result.checkpoint.name == "step_0000006"


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    order = _order()
    with pytest.raises(BertforgeError, match="not finite for 3 steps in a row .*step_0000004 is intact"):
        _toy_run(tmp_path, {order[4], order[5], order[6]}, steps=20, save_every=2)
    last = checkpoint.latest_complete_checkpoint(tmp_path)
    assert last.name == "step_0000004"
    state, meta = checkpoint.load_checkpoint(last, nn.Linear(4, 1))
    assert meta["instances"] == 4


def test_rollback_reloads_the_last_checkpoint_and_skips_the_bad_batches(tmp_path):
    order = _order()
    model, result, records, loader = _toy_run(tmp_path, {order[4], order[5], order[6]}, steps=10,
                                              on_nan="rollback", save_every=2)
    rollback = [r for r in records if r.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 4
    assert result.step == 10 and loader.instances == 13  # 3 batches skipped: steps 5-7 re-run on new data
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(BertforgeError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(BertforgeError, match="fp16 needs a CUDA device"):  # before any step
        train(nn.Linear(1, 1), optimizer=None, scheduler=None, loader=None, count_fn=None, loss_fn=None,
              metrics_fn=None, evaluate_fn=None, monitor=None, run_dir=tmp_path,
              config=LoopConfig(max_steps=1, precision="fp16"), device=torch.device("cpu"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_saves_once_and_restores_the_handlers(tmp_path, monkeypatch, signum):
    stop_signals = train.__globals__["_StopSignals"]
    original = stop_signals.__enter__
    before = signal.getsignal(signum)

    def enter_and_signal(self):
        entered = original(self)
        signal.raise_signal(signum)  # arrives during the run: the loop must finish the step and save
        return entered

    monkeypatch.setattr(stop_signals, "__enter__", enter_and_signal)
    model, result, records, loader = _toy_run(tmp_path, set(), steps=50)
    assert result.stop_reason == "signal" and result.interrupted and result.step == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]
    assert json.loads((result.checkpoint / "meta.json").read_text())["instances"] == 1
    assert signal.getsignal(signum) is before
