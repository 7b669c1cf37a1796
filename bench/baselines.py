"""Single-process baselines the swarm benchmarks compare against, measured in the same run.

- :func:`train_loop`: a plain torch training loop with the swarm job's model, batch,
  micro-batching (gradient accumulation over the micro-batches), AdamW + clipping, dtype and
  device, in one process. Its tokens/s is the bound a pipeline of the same job is held to.
- :func:`hf_generate`: ``transformers``' ``generate`` on the same checkpoint
  (``AutoModelForCausalLM.from_pretrained``), same dtype and device, KV cache, greedy, a fixed
  number of new tokens (``min_new_tokens`` = ``max_new_tokens``, so eos never stops it early).

Both run in the calling process with ``threads`` torch threads (set, then restored), so a
benchmark can give the baseline as many threads as its node processes have together.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_loop(model_dir: Path, data_text: str, *, seq_len: int, batch_size: int, micro_batch_size: int,
               num_samples: int, steps: int, warm_from_step: int, lr: float, device: str, threads: int,
               seed: int = 0) -> dict:
    """Train the whole model in this process; tokens/s over steps >= ``warm_from_step``.

    Same code path as a stage worker that holds every layer (``StageRunner`` with loss scaled by
    1 / micro-batches, ``clip_and_step``), so the only difference to the swarm is the pipeline.
    """
    from swarm.model.checkpoint import load_config, load_stage
    from swarm.model.tokenizer import load_tokenizer
    from swarm.pipeline.data import BatchOrder, tokenize
    from swarm.pipeline.optim import OptimConfig, clip_and_step, make_optimizer
    from swarm.pipeline.stage import StageRunner

    with _threads(threads):
        torch.manual_seed(seed)
        config = load_config(model_dir)
        model = load_stage(model_dir, 0, config.num_layers, is_first=True, is_last=True, device=device)
        tok = load_tokenizer(model_dir)
        ds = tokenize([data_text], encode=tok.encode, seq_len=seq_len, eos_id=None)
        n = min(num_samples, ds.num_samples)
        order = BatchOrder(num_samples=n, batch_size=batch_size, micro_batch_size=micro_batch_size, seed=seed)
        cfg = OptimConfig(lr=lr, total_steps=steps)
        opt = make_optimizer(model.parameters(), cfg)
        runner = StageRunner(model, is_first=True, is_last=True, loss_scale=1.0 / order.num_micro_batches)
        params = list(model.parameters())
        warm_s, warm_tokens, losses = 0.0, 0, []
        for step in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            for m, ids in enumerate(order.micro_batches(step, 0)):
                x = torch.from_numpy(ds.inputs(ids)).to(device)
                y = torch.from_numpy(ds.labels(ids)).to(device)
                runner.forward(m, x, y)
                runner.backward(m)
            clip_and_step(opt, params, step, cfg)
            losses.append(runner.step_loss())
            _sync(device)
            if step >= warm_from_step:
                warm_s += time.perf_counter() - t0
                warm_tokens += batch_size * seq_len
    return {"tokens_per_s": warm_tokens / warm_s if warm_s else 0.0, "steps": max(0, steps - warm_from_step),
            "final_loss": losses[-1] if losses else float("nan"), "threads": threads}


def hf_generate(model_dir: Path, prompt_ids: list[int], *, new_tokens: int, batch: int, device: str,
                dtype: torch.dtype, threads: int, repeats: int = 1) -> dict:
    """``generate`` with a KV cache, greedy, exactly ``new_tokens`` per row; best of ``repeats``.

    Returns aggregate tokens/s (batch x new tokens / wall time, prefill included), time to
    first token (a ``max_new_tokens=1`` call) and decode ms per token (per row).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with _threads(threads):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        ids = torch.tensor([prompt_ids] * batch, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0

        def gen(n: int) -> float:
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, use_cache=True, pad_token_id=pad, num_beams=1)
            _sync(device)
            assert out.shape[1] == ids.shape[1] + n, out.shape
            return time.perf_counter() - t0

        gen(new_tokens)  # warm-up: the first call in a process was 5x slower on the H200 (gen(2) was not enough)
        best = None
        for _ in range(max(1, repeats)):
            ttft = gen(1)
            total = gen(new_tokens)
            r = {"tokens_per_s": batch * new_tokens / total, "ttft_s": ttft,
                 "ms_per_token": 1e3 * max(total - ttft, 1e-9) / max(1, new_tokens - 1)}
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                best = r
        del model
    return best
