"""Train-step throughput of ``ContrastiveStep`` against a plain PyTorch loop, same model, batch and precision.

An XLM-R-base-shaped encoder (hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary 250,002; random
weights, a small bundled BPE tokenizer: the vocabulary only sizes the embedding lookup and the
optimiser state) is trained on in-batch InfoNCE over English NTREX queries (<= ``--query-len``
tokens) and passages of 1-4 consecutive sentences (<= ``--passage-len`` tokens). Both loops get the
same pre-tokenized batches (padded to the batch's longest text, as a plain loop does), the same
initial weights, the same precision (bf16 autocast on GPU, fp32 on CPU), SDPA attention, and
AdamW; they run interleaved round by round so background load hits both alike.

- **plain**: ``model(q)``, ``model(p)``, cross-entropy over ``q @ p.T / τ``, ``backward``,
  ``torch.optim.AdamW`` (default implementation).
- **ours**: :class:`~babelforge.train.step.ContrastiveStep` (length-sorted chunks with trimmed
  padding, optional GradCache) + fused AdamW on GPU + ``torch.compile`` of the backbone on GPU.

Reported: pairs/s, real tokens/s, MFU (model FLOPs of the real tokens: 6 x non-embedding params x
tokens + 12 x layers x hidden x length² per sequence for attention, over the peak) and HFU (FLOPs
actually executed: padding included, plus the extra forward pass of GradCache). The peak is
``--peak-tflops``, else the dense bf16/fp32 figure of a known GPU, else a large matmul measured in
the same run (always on CPU). Needs only torch + transformers (no Ray)::

    PYTHONPATH=platform python benchmarks/train_throughput.py                        # CPU, small batch
    PYTHONPATH=platform python benchmarks/train_throughput.py --batch-size 256 \\
        --out benchmarks/results/train_throughput_gpu.json                           # one GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from babelforge.models.embedder import Embedder, EmbedderConfig, embedder_flops_per_token
from babelforge.models.tiny import build_tiny_tokenizer
from babelforge.resources import ntrex_file
from babelforge.train.gradcache import plan_chunks
from babelforge.train.losses import InfoNCELoss
from babelforge.train.step import ContrastiveStep, TokenizedBatch

TEMPERATURE = 0.05
# Dense peak TFLOP/s by (GPU name fragment, precision): vendor datasheet figures without sparsity.
KNOWN_PEAKS = {("H100", "bf16"): 989.0, ("H200", "bf16"): 989.0, ("A100", "bf16"): 312.0,
               ("H100", "fp32"): 494.7, ("H200", "fp32"): 494.7, ("A100", "fp32"): 156.0}  # fp32 = TF32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default 256 on GPU, 8 on CPU)")
    parser.add_argument("--query-len", type=int, default=32)
    parser.add_argument("--passage-len", type=int, default=128)
    parser.add_argument("--lengths", choices=["mixed", "fixed"], default="mixed",
                        help="mixed: natural text lengths up to the limits; fixed: every text at the limit")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab-size", type=int, default=250_002)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU (both loops alike)")
    parser.add_argument("--chunk-size", type=int, help="rows per pass of ours_chunked / ours_gradcache "
                                                            "(default: batch/4)")
    parser.add_argument("--grad-cache", action="store_true", help="also measure ours with GradCache")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the backbone in ours (auto: on GPU only)")
    parser.add_argument("--steps", type=int, help="timed steps per loop per round (default: 10 GPU, 2 CPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 3 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per loop first, compilation included "
                                                      "(default: 3 GPU, 1 CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, help="peak for MFU (default: known GPU or measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/train_throughput_<device>.json)")
    return parser.parse_args()


# ----------------------------------------------------------------------------- model and data
def build_model(args: argparse.Namespace, tokenizer: Any, device: torch.device) -> Embedder:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, intermediate_size=args.intermediate,
                              max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    backbone = XLMRobertaModel(config, add_pooling_layer=False)
    return Embedder(backbone, tokenizer, EmbedderConfig(pooling="mean", max_length=512)).to(device)


def make_batches(args: argparse.Namespace, model: Embedder, count: int) -> list[TokenizedBatch]:
    lines = ntrex_file("en").read_text(encoding="utf-8").splitlines()
    rng = random.Random(args.seed)
    batches = []
    for b in range(count):
        queries, passages = [], []
        for k in range(args.batch_size):
            i = (b * args.batch_size + k) * 7 % (len(lines) - 8)
            words = lines[i].split()
            if args.lengths == "fixed":  # long enough to be truncated at the limit
                queries.append(" ".join(lines[i:i + 3]))
                passages.append(" ".join(lines[i + 1:i + 9]))
            else:
                queries.append(" ".join(words[:rng.randint(4, 20)]))
                passages.append(" ".join(lines[i + 1:i + 1 + rng.randint(1, 4)]))
        batches.append(TokenizedBatch(model.tokenize(queries, prompt="", max_length=args.query_len),
                                      model.tokenize(passages, prompt="", max_length=args.passage_len), 0))
    return batches


# ----------------------------------------------------------------------------- FLOPs and peak
def model_flops(model: Embedder, batch: TokenizedBatch) -> float:
    """Training FLOPs of the real tokens: 3 x forward (6 x params x tokens, plus attention)."""
    per_token = embedder_flops_per_token(model)  # 2 x non-embedding params
    cfg = model.backbone.config
    total = 0.0
    for feats in (batch.queries, batch.passages):
        lengths = feats["attention_mask"].sum(dim=1).double()
        total += 3 * (per_token * float(lengths.sum())
                      + 4 * cfg.num_hidden_layers * cfg.hidden_size * float((lengths ** 2).sum()))
    return total


def padded_flops(model: Embedder, batch: TokenizedBatch, widths: list[tuple[int, int]], passes: float) -> float:
    """FLOPs executed over ``(rows, width)`` blocks; ``passes`` = 3 for fwd+bwd, 4 with GradCache."""
    per_token = embedder_flops_per_token(model)
    cfg = model.backbone.config
    return passes * sum(rows * (per_token * width + 4 * cfg.num_hidden_layers * cfg.hidden_size * width ** 2)
                        for rows, width in widths)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best achieved TFLOP/s of a large square matmul (the CPU's and unknown GPUs' practical peak)."""
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5 if device.type == "cuda" else 3):
        sync(device)
        started = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        sync(device)
        best = max(best, (10 if device.type == "cuda" else 2) * 2 * n ** 3 / (time.perf_counter() - started) / 1e12)
    return best


def peak_tflops(args: argparse.Namespace, device: torch.device, precision: str) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (fragment, prec), value in KNOWN_PEAKS.items():
            if fragment in name and prec == precision:
                return value, f"datasheet dense {precision} peak of {fragment}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_peak_tflops(device, dtype), f"measured {dtype} matmul in this run"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the loops
Loop = Callable[[TokenizedBatch], float]


def plain_loop(model: Embedder, autocast_dtype: torch.dtype | None) -> Loop:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch: TokenizedBatch) -> float:
        batch = batch.to(model.device)
        with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            q = model(batch.queries)
            p = model(batch.passages)
        scores = q.float() @ p.float().T / TEMPERATURE
        loss = F.cross_entropy(scores, torch.arange(len(q), device=q.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def our_loop(train_step: ContrastiveStep, optimizer: torch.optim.Optimizer) -> Loop:
    def step(batch: TokenizedBatch) -> float:
        metrics = train_step.run(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return metrics.loss

    return step


def timed(step: Loop, batches: list[TokenizedBatch], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def summarize(seconds: list[float], pairs: int, tokens: float, flops: float, hw_flops: float,
              peak: float) -> dict[str, Any]:
    step_s = statistics.median(seconds)
    return {"step_ms_median": round(step_s * 1e3, 2), "step_ms_per_round": [round(s * 1e3, 2) for s in seconds],
            "pairs_per_s": round(pairs / step_s, 2), "tokens_per_s": round(tokens / step_s, 1),
            "mfu": round(flops / step_s / (peak * 1e12), 4), "hfu": round(hw_flops / step_s / (peak * 1e12), 4)}


def executed_flops(model: Embedder, batch: TokenizedBatch, step: ContrastiveStep | None) -> float:
    """FLOPs the loop executes on ``batch``: whole padded tensors for plain, trimmed chunks for ours."""
    if step is None:
        widths = [tuple(f["input_ids"].shape) for f in (batch.queries, batch.passages)]
    else:
        plans = [plan_chunks(f["attention_mask"], step.chunk_size, pad_to_multiple_of=step.pad_to_multiple_of)
                 for f in (batch.queries, batch.passages)]
        widths = [(len(c.rows), c.columns.stop - c.columns.start) for plan in plans for c in plan]
    return padded_flops(model, batch, widths, 4 if step is not None and step.grad_cache else 3)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 8)
    args.steps, args.rounds, args.warmup = (args.steps or (10 if gpu else 2), args.rounds or (3 if gpu else 2),
                                            args.warmup if args.warmup is not None else (3 if gpu else 1))
    chunk_size = args.chunk_size or max(1, args.batch_size // 4)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores, in both loops
        torch.backends.cudnn.allow_tf32 = True

    # One set of weights; plain runs the eager backbone, ours a compiled view of the same parameters
    # (on GPU), so both train the same model and memory holds one copy plus two optimiser states.
    tokenizer = build_tiny_tokenizer()
    plain_model = build_model(args, tokenizer, device).train()
    our_model = Embedder(torch.compile(plain_model.backbone) if use_compile else plain_model.backbone, tokenizer,
                         plain_model.config)
    batches = make_batches(args, plain_model, args.warmup + args.steps)
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-5, fused=device.type == "cuda")
    steps = {"ours": ContrastiveStep(our_model, InfoNCELoss(TEMPERATURE), max_query_length=512,
                                     max_passage_length=512, autocast_dtype=autocast_dtype)}
    steps["ours_chunked"] = ContrastiveStep(our_model, InfoNCELoss(TEMPERATURE), max_query_length=512,
                                            max_passage_length=512, autocast_dtype=autocast_dtype,
                                            chunk_size=chunk_size)
    if args.grad_cache:
        steps["ours_gradcache"] = ContrastiveStep(our_model, InfoNCELoss(TEMPERATURE), max_query_length=512,
                                                  max_passage_length=512, autocast_dtype=autocast_dtype,
                                                  chunk_size=chunk_size, grad_cache=True)
    loops = {"plain": plain_loop(plain_model, autocast_dtype),
             **{name: our_loop(step, optimizer) for name, step in steps.items()}}
    compile_note = "torch.compile (default mode) of the backbone" if use_compile else "off"
    for name, loop in loops.items():
        for batch in batches[:args.warmup]:
            try:
                loop(batch)
            except Exception as err:  # no working compiler toolchain on this machine: measure eager instead
                if name == "plain" or our_model.backbone is plain_model.backbone:
                    raise
                compile_note = f"compile failed ({type(err).__name__}: {str(err)[:200]}); eager"
                our_model.backbone = plain_model.backbone
                loop(batch)
    timed_batches = batches[args.warmup:]
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):  # interleaved, so background load hits every loop alike
        for name, loop in loops.items():
            seconds[name].append(timed(loop, timed_batches, device))

    peak, peak_source = peak_tflops(args, device, precision)
    pairs = args.batch_size
    tokens = statistics.mean(float(b.queries["attention_mask"].sum() + b.passages["attention_mask"].sum())
                             for b in timed_batches)
    flops = statistics.mean(model_flops(plain_model, b) for b in timed_batches)
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "precision": precision, "peak_tflops": round(peak, 3), "peak_source": peak_source,
        "model": {"shape": "XLM-R base", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab_size": args.vocab_size,
                  "params": sum(p.numel() for p in plain_model.parameters()),
                  "non_embedding_params": int(embedder_flops_per_token(plain_model) // 2), "attention": "sdpa"},
        "batch": {"pairs": pairs, "query_len": args.query_len, "passage_len": args.passage_len,
                  "lengths": args.lengths, "real_tokens_per_step": tokens,
                  "padded_tokens_per_step": statistics.mean(
                      b.queries["input_ids"].numel() + b.passages["input_ids"].numel() for b in timed_batches)},
        "timing": {"warmup_steps": args.warmup, "timed_steps_per_round": args.steps, "rounds": args.rounds},
        "model_tflops_per_step": round(flops / 1e12, 4),
        "plain": {"description": "model(q), model(p), CE(q @ p.T / tau), backward, torch.optim.AdamW default",
                  **summarize(seconds["plain"], pairs, tokens, flops,
                              statistics.mean(executed_flops(plain_model, b, None) for b in timed_batches), peak)},
    }
    for name, step in steps.items():
        result[name] = {"description": "ContrastiveStep + AdamW (fused on GPU)", "chunk_size": step.chunk_size,
                        "grad_cache": step.grad_cache, "compile": compile_note,
                        **summarize(seconds[name], pairs, tokens, flops,
                                    statistics.mean(executed_flops(plain_model, b, step) for b in timed_batches),
                                    peak)}
        result[name]["ratio_pairs_per_s"] = round(result[name]["pairs_per_s"] / result["plain"]["pairs_per_s"], 3)
    best = max(steps, key=lambda n: result[n]["pairs_per_s"])
    result["best"] = {"variant": best, "ratio_pairs_per_s": result[best]["ratio_pairs_per_s"]}
    out = Path(args.out or f"benchmarks/results/train_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ntrain step, XLM-R-base shape, {pairs} pairs x ({args.query_len}q + {args.passage_len}p tokens, "
          f"{args.lengths}), {precision}, {result['device_name']}, peak {peak:.1f} TFLOP/s ({peak_source})")
    print(f"{'loop':<16}{'step ms':>10}{'pairs/s':>10}{'tokens/s':>12}{'MFU':>8}{'HFU':>8}{'x plain':>9}")
    for name in loops:
        r = result[name]
        print(f"{name:<16}{r['step_ms_median']:>10.1f}{r['pairs_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}"
              f"{r['mfu']:>8.1%}{r['hfu']:>8.1%}{r.get('ratio_pairs_per_s', 1.0):>9.2f}")
    print(f"best: {best} at {result['best']['ratio_pairs_per_s']:.2f}x the plain loop -> {out}")


if __name__ == "__main__":
    main()
