"""The training loop: ``Trainer(cfg).fit()`` on one CPU/GPU or many GPUs under torchrun.

One optimizer step = ``grad_accum`` micro-steps on every rank; the global batch
(``cfg.batch_size`` sequences) is split evenly over ranks and micro-steps, and each micro-loss is
divided by ``grad_accum`` so that, after DDP/FSDP2 average the gradients over ranks, the update is
exactly the one of the full-batch mean loss.
"""

from __future__ import annotations


import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint_tokenizer,
    load_model,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from .config import TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_optimizer_state_dict,
    no_sync,
    setup_distributed,
    teardown_distributed,
    unwrap_model,
    wrap_model,
)
from .plots import plot_loss_curve
from ..layers.routing import routing_aux_loss, routing_layers, update_routing_centroids

__all__ = ["Trainer", "WarmupCosine", "evaluate", "build_optimizer", "autocast_dtype"]


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_ratio`` at ``total_steps``.

    A class (not a closure) so ``LambdaLR.state_dict()`` can record its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices of linear layers, not on norms, biases or embeddings.

    Decaying an embedding table pulls rarely seen tokens to zero, and norm gains/biases are not
    scale parameters that benefit from decay (the usual GPT practice).
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() de-duplicates tied weights
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` = plain fp32)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None  # bf16 autocast only on CUDA: on CPU it is slow and changes results for no gain
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # use_cache=False: training and scoring never need the generation cache.
    return model(input_ids=x, use_cache=False).logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) and perplexity over consecutive windows of ``tokens``.

    Args:
        model: a causal LM returning ``.logits [B, T, V]`` (may be DDP- or FSDP2-wrapped).
        tokens: ``LongTensor [N]``, e.g. the validation split.
        batch_size: sequences per batch (global: split over ranks when ``dist_info`` is distributed).
        seq_len: tokens per sequence.
        max_batches: evaluate at most this many batches (``None`` = the whole stream).
        device: where to run; default = the model's device.
        amp_dtype: autocast dtype (``None`` = fp32).
        dist_info: the trainer's :class:`DistInfo`; when distributed, each rank scores a slice of
            every batch and the sums are all-reduced, so every rank returns the same numbers.
        micro_batch_size: run each rank's slice in forwards of at most this many rows (bounds
            memory without changing which windows are scored, hence the result).

    Returns:
        ``{"loss": float, "ppl": float, "tokens": int}``.
    """
    from ..tasks import IGNORE_INDEX, SequentialBatches

    info = dist_info
    rank, world = (info.rank, info.world_size) if info is not None and info.is_distributed else (0, 1)
    # DDP's forward may broadcast buffers (a collective); its inner module is identical and
    # collective-free. FSDP2 must run through the sharded module on every rank.
    net = unwrap_model(model)
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        # Batches are taken globally and split by rows here (not by the sampler), so every rank
        # runs the same number of forwards, which FSDP2's collectives require.
        rows_per_rank = -(-batch_size // world)
        n_chunks = -(-rows_per_rank // micro_batch_size) if micro_batch_size else 1
        for x, y in SequentialBatches(tokens, batch_size, seq_len, max_batches=max_batches):
            xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
            for xc, yc in zip(xs.tensor_split(n_chunks), ys.tensor_split(n_chunks)):
                dummy = xc.shape[0] == 0
                if dummy:  # an empty share of this batch: forward anyway (FSDP2 collectives), weight 0
                    xc, yc = x[:1], y[:1]
                xc, yc = xc.to(device, non_blocking=True), yc.to(device, non_blocking=True)
                with _autocast(device, amp_dtype):
                    logits = _forward_logits(net, xc)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yc.reshape(-1), reduction="sum")
                if not dummy:
                    loss_sum += loss.double()
                    # The last batch is padded with IGNORE_INDEX labels, which cross_entropy skips.
                    count += (yc != IGNORE_INDEX).sum()
    finally:
        net.train(was_training)
    if info is not None:
        all_reduce_sum(loss_sum, info)
        all_reduce_sum(count, info)
    if count.item() == 0:
        raise ValueError(f"evaluate: no complete window of seq_len={seq_len} + 1 tokens in {tokens.numel()} tokens")
    mean = (loss_sum / count).item()
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(count.item())}


class _Metrics:
    """JSON lines in ``out_dir/metrics.jsonl`` plus the in-memory history used for plots (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.is_file():
            # Keep the history up to the checkpoint; rows logged after it (before an interruption)
            # are about to be recomputed and would otherwise appear twice.
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by the interruption
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")



def lm_loss(logits: torch.Tensor, labels: torch.Tensor, normalization: str = "token") -> torch.Tensor:
    """Next-token cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` (``-100`` = no target).

    ``"token"``: the mean over all labelled tokens of the batch (the usual LM loss). ``"row"``: the
    mean over rows of each row's mean over its labelled tokens, so that a row with few targets (a
    needle-retrieval row labelled on its answer only) weighs as much as a row of text; rows without
    targets are skipped.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    if normalization == "token":
        return F.cross_entropy(flat_logits, labels.reshape(-1))
    if normalization != "row":
        raise ValueError(f"normalization must be 'token' or 'row', got {normalization!r}")
    per_token = F.cross_entropy(flat_logits, labels.reshape(-1), reduction="none").view(labels.shape)
    counts = (labels != -100).sum(-1)
    rows = counts > 0
    return (per_token.sum(-1)[rows] / counts[rows]).mean()

class Trainer:
    """Train a ``MnemoForCausalLM`` as described by a :class:`TrainConfig`.

    >>> from mnemotorch.train import Trainer, load_config
    >>> summary = Trainer(load_config("configs/tiny_shakespeare.toml")).fit()  # doctest: +SKIP

    After :meth:`fit`, ``trainer.model`` (unwrapped), ``trainer.tokenizer`` and
    ``trainer.history`` (the metric rows) are available.

    Args:
        cfg: the run's configuration.
        progress: show a tqdm bar on rank 0 (tqdm hides it when stderr is not a terminal).
        verbose: print evaluation results and checkpoint paths on rank 0.
        print_fn: where messages go (default ``tqdm.write``, which keeps the bar intact).
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, verbose: bool = True,
                 print_fn: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self.verbose = verbose
        self._print_fn = print_fn
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.history: list[dict[str, Any]] = []
        self.info: DistInfo | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.verbose and self.info is not None and self.info.is_main:
            if self._print_fn is not None:
                self._print_fn(msg)
            else:
                from tqdm.auto import tqdm

                tqdm.write(msg)

    def _resolve_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            return find_checkpoint(self.cfg.out_dir)
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"resume checkpoint {str(path)!r} does not exist")
        return verify_checkpoint(path, need_trainer_state=True)

    # -- main entry point --------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Run (or continue) training; return a summary dict.

        Returns:
            ``{"steps", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "parameters",
            "elapsed_s", "stopped_early", "out_dir", "checkpoint"}`` (identical on every rank).
        """
        self.info = setup_distributed(self.cfg.distributed, self.cfg.device)
        try:
            return self._fit(self.info)
        finally:
            teardown_distributed(self.info)

    def _fit(self, info: DistInfo) -> dict[str, Any]:
        from ..models import MnemoConfig, MnemoForCausalLM
        from ..tasks import RandomWindowBatches, build_tokenizer, encode_corpus, load_text, split_text

        cfg = self.cfg
        device = info.device
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        per_rank = cfg.batch_size // info.world_size
        if cfg.batch_size % (info.world_size * cfg.grad_accum) != 0:
            raise ValueError(
                f"batch_size ({cfg.batch_size}) must be divisible by world_size ({info.world_size}) "
                f"x grad_accum ({cfg.grad_accum}) so every rank and micro-step gets the same number of sequences"
            )
        micro = per_rank // cfg.grad_accum
        # Same seed on every rank: identical initial weights (DDP would broadcast anyway; FSDP2 shards them).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        ckpt = self._resolve_resume()
        state = load_trainer_state(ckpt) if ckpt is not None else None

        # ---- data and tokenizer
        text = load_text(cfg.data.source)
        train_text, val_text = split_text(text, cfg.data.val_fraction)
        if ckpt is not None:
            tok = load_checkpoint_tokenizer(ckpt)
        else:
            tok = build_tokenizer(cfg.data.tokenizer, text=train_text, vocab_size=cfg.data.vocab_size,
                                  split_digits=cfg.data.split_digits)
        self.tokenizer = tok
        train_tokens = encode_corpus(train_text, tok)
        val_tokens = encode_corpus(val_text, tok)

        # ---- model (full weights on every rank before wrapping)
        if ckpt is not None:
            model = load_model(ckpt)
            if model.config.vocab_size != tok.vocab_size:
                raise CheckpointError(f"{ckpt}: model vocab_size {model.config.vocab_size} != tokenizer vocab_size {tok.vocab_size}")
        else:
            model = MnemoForCausalLM(MnemoConfig(**cfg.model, vocab_size=tok.vocab_size))
        model.to(device)
        self.model = model
        n_params = sum(p.numel() for p in model.parameters())
        wrapped = wrap_model(model, info)
        amp = autocast_dtype(cfg.precision, device)

        # ---- optimizer, schedule, batches
        optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
        )
        batches = RandomWindowBatches(train_tokens, cfg.batch_size, cfg.data.seq_len, seed=cfg.seed,
                                      rank=info.rank, world_size=info.world_size)
        if cfg.data.needle_fraction > 0:
            from ..tasks import NeedleMixBatches

            haystacks = {"text": [train_text], "synthetic": [None], "both": [None, train_text]}[cfg.data.needle_haystack]
            batches = NeedleMixBatches(batches, tok, haystacks, cfg.data.needle_fraction, cfg.data.needle_kinds,
                                       seed=cfg.seed, loss=cfg.data.needle_loss)
        start_step = 0
        if state is not None:
            load_full_optimizer_state_dict(wrapped, optimizer, state["optimizer"], info)
            # The schedule's shape comes from the current config (steps may have been raised to
            # extend a run), its position from the checkpoint; same config => the same lr, bit for bit.
            sched_state = dict(state["scheduler"])
            sched_state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
            scheduler.load_state_dict(sched_state)
            scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
            for group, base_lr, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["initial_lr"] = base_lr
                group["lr"] = base_lr * fn(scheduler.last_epoch)
            batches.load_state_dict(state["data"])
            start_step = int(state["step"])
            if batches.step != start_step:
                raise CheckpointError(f"{ckpt}: data sampler is at step {batches.step} but the trainer at step {start_step}")
            # Last, so nothing above consumes random numbers the uninterrupted run did not.
            restore_rng_state(state["rng"])

        out_dir = Path(cfg.out_dir)
        metrics = _Metrics(out_dir / "metrics.jsonl", enabled=info.is_main, resume_step=start_step if state else None)
        self.history = metrics.rows
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if ckpt is not None:
            self._say(f"resumed from {ckpt} at step {start_step}")
        self._say(f"model: {n_params:,} parameters; {info.world_size} process(es), mode={info.mode}, device={device}, "
                  f"autocast={amp}; global batch {cfg.batch_size} x {cfg.data.seq_len} tokens, grad_accum={cfg.grad_accum}")

        end_step = cfg.steps if cfg.stop_at_step is None else min(cfg.steps, cfg.stop_at_step)
        tokens_per_step = cfg.batch_size * cfg.data.seq_len
        last_train_loss = float("nan")
        last_eval: dict[str, float] = {}
        ckpt_path: Path | None = ckpt

        def run_eval(step: int) -> None:
            nonlocal last_eval
            # The global batch, in micro-batches: the scored windows do not depend on grad_accum or world size.
            res = evaluate(wrapped, val_tokens, cfg.batch_size, cfg.data.seq_len, cfg.eval_batches, device=device,
                           amp_dtype=amp, dist_info=info, micro_batch_size=micro)
            last_eval = res
            metrics.log({"step": step, "tokens_seen": step * tokens_per_step, "val_loss": res["loss"], "val_ppl": res["ppl"]})
            self._say(f"step {step}: val loss {res['loss']:.4f}, ppl {res['ppl']:.2f}")
            if info.is_main:
                try:
                    plot_loss_curve(metrics.rows, out_dir / "loss.png", title=f"{out_dir.name}")
                except Exception as err:  # noqa: BLE001 - a plot must never end a training run
                    warnings.warn(f"could not write {out_dir / 'loss.png'}: {type(err).__name__}: {err}", stacklevel=2)

        def save(step: int) -> None:
            nonlocal ckpt_path
            # Collectives first (every rank), then rank 0 writes.
            model_sd = full_model_state_dict(wrapped, info)
            optim_sd = full_optimizer_state_dict(wrapped, optimizer, info)
            if info.is_main:
                trainer_state = {
                    "step": step,
                    "optimizer": optim_sd,
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "data": batches.state_dict(),
                    "config": cfg.to_dict(),
                    "world_size": info.world_size,
                }
                ckpt_path = save_checkpoint(out_dir, model, tok, trainer_state, model_state_dict=model_sd)
                self._say(f"step {step}: checkpoint written to {ckpt_path}")
            barrier(info)
            ckpt_path = out_dir / "checkpoint"

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=out_dir.name or "train", unit="step",
                   disable=True if not (self.progress and info.is_main) else None, dynamic_ncols=True)
        wrapped.train()
        has_routing = bool(routing_layers(wrapped))
        t_start = time.perf_counter()
        t_log = t_start
        steps_since_log = 0
        overhead = overhead_since_log = 0.0
        step = start_step
        try:
            while step < end_step:
                lr = optimizer.param_groups[0]["lr"]
                x, y = next(batches)  # batch number `step`: a pure function of (seed, step)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss_acc = torch.zeros((), device=device)
                for i in range(cfg.grad_accum):
                    xm, ym = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
                    with no_sync(wrapped, info, skip=i < cfg.grad_accum - 1):
                        with _autocast(device, amp):
                            logits = _forward_logits(wrapped, xm)
                        loss = lm_loss(logits, ym, cfg.loss_normalization)
                        # auxiliary losses of mixers (routing's commitment loss); the logged loss stays the LM loss
                        total = loss + routing_aux_loss(wrapped) if has_routing else loss
                        (total / cfg.grad_accum).backward()
                    loss_acc += loss.detach()
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
                optimizer.step()
                if has_routing:  # online k-means step of routing centroids (explicit, no hooks)
                    update_routing_centroids(wrapped)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_since_log += 1
                bar.update(1)

                final = step == end_step
                if step % cfg.log_interval == 0 or final:
                    # Mean over micro-steps, then over ranks: the loss of the whole global batch.
                    step_loss = all_reduce_sum(loss_acc / cfg.grad_accum, info) / info.world_size
                    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                        grad_norm = grad_norm.full_tensor()
                    last_train_loss = step_loss.item()
                    if not math.isfinite(last_train_loss):
                        raise FloatingPointError(f"step {step}: training loss is {last_train_loss}; lower optim.lr or check the data")
                    now = time.perf_counter()
                    tps = tokens_per_step * steps_since_log / max(now - t_log - overhead_since_log, 1e-9)
                    t_log, steps_since_log, overhead_since_log = now, 0, 0.0
                    metrics.log({"step": step, "lr": lr, "loss": last_train_loss, "grad_norm": float(grad_norm),
                                 "tokens_per_s": tps})
                    bar.set_postfix(loss=f"{last_train_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                t_overhead = time.perf_counter()
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or final:
                    run_eval(step)
                if (cfg.save_interval and step % cfg.save_interval == 0) or final:
                    save(step)
                # Evaluation and checkpoints are not training throughput.
                dt = time.perf_counter() - t_overhead
                overhead += dt
                overhead_since_log += dt
        finally:
            bar.close()

        elapsed = time.perf_counter() - t_start
        if step == start_step and not last_eval:  # nothing left to train (resumed a finished run)
            run_eval(step)
        return {
            "steps": step,
            "train_loss": last_train_loss,
            "val_loss": last_eval.get("loss", float("nan")),
            "val_ppl": last_eval.get("ppl", float("nan")),
            "tokens_per_s": tokens_per_step * (step - start_step) / max(elapsed - overhead, 1e-9) if step > start_step else float("nan"),
            "parameters": n_params,
            "elapsed_s": elapsed,
            "stopped_early": step < cfg.steps,
            "out_dir": str(out_dir),
            "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        }
