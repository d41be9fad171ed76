"""``diptych bench engine``: decode and prefill speed of Diptych's engine against HF transformers (same model, same
process) and against the hardware floor, plus a greedy agreement check and an attention-variant comparison.

Decode: ``batch`` requests with ``context``-token prompts are prefilled, then ``steps`` decode iterations are timed
through ``Engine.step`` (host work and the sampled-token read included); "GPU ms" replays the captured CUDA graph
of the same batch alone. Floor = (weight bytes + KV bytes read per step) / measured copy bandwidth.
Prefill: one prompt of ``L`` tokens in one iteration, and 2048 tokens in 512-token chunks (4 iterations), against
HF's single forward pass; TFLOP/s counts 2 x parameters x tokens + causal attention (2 x L^2 x heads x head_dim per
layer).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from diptych.benchmarks import checks, hf_baseline
from diptych.benchmarks.common import (
    ModelUnderTest,
    build_model,
    copy_bandwidth,
    environment,
    matmul_rate,
    median,
    random_prompts,
    sync,
    table,
    write_json,
)
from diptych.engine import Engine, EngineConfig
from diptych.engine.model_runner import ModelRunner
from diptych.policies.batch import SarathiBatching
from diptych.proto.messages import SamplingParams

if TYPE_CHECKING:
    from diptych.engine.cuda_runner import CudaExecutor


def make_engine(mut: ModelUnderTest, device: str, max_batch: int, kv_gb: float, max_model_len: int,
                token_budget: int, graphs: bool = True, fused: bool = True) -> Engine:
    config = EngineConfig(model=mut.tokenizer_path, device=device, dtype=str(mut.model.dtype).removeprefix("torch."),
                          block_size=16, kv_memory_gb=kv_gb, max_model_len=max_model_len,
                          cuda_graph_max_batch=max_batch if graphs else 0, cuda_fused_decode=fused)
    policy = SarathiBatching(token_budget=token_budget, max_running=max(max_batch, 1), max_decodes=max(max_batch, 1))
    return Engine(config, policy, model=mut.model)


def run_until_idle(engine: Engine) -> list[float]:
    durations = []
    while engine.has_work():
        durations.append(engine.step().duration_s)
    return durations


def decode_point(engine: Engine, mut: ModelUnderTest, batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    """Time ``steps`` decode iterations of ``batch`` sequences at about ``context`` tokens."""
    vocab = mut.model.config.vocab_size
    sampling = SamplingParams(max_tokens=warmup + steps + 64, temperature=0.0, ignore_eos=True)  # aborted after
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, random_prompts(batch, context, vocab, seed=batch)):
        engine.add_request(request_id, prompt, sampling)
    started: set[str] = set()
    while len(started) < batch:  # prefill (in the policy's token budget), first tokens sampled
        started.update(t.request_id for t in engine.step().tokens)
    for _ in range(warmup):
        engine.step()
    durations = []
    for _ in range(steps):
        output = engine.step()
        if output.num_decodes != batch or output.num_prefill_tokens:
            raise RuntimeError(f"expected {batch} decodes, got {output.num_decodes} (+{output.num_prefill_tokens})")
        durations.append(output.duration_s)
    gpu = _graph_replay_seconds(engine, batch)
    for request_id in ids:
        engine.abort(request_id)
    step = median(durations)
    avg_context = context + warmup + steps / 2
    return {"batch": batch, "context": context, "step_s": step, "gpu_step_s": gpu, "tokens_per_s": batch / step,
            "kv_bytes": batch * avg_context * mut.kv_bytes_per_token}


def _cuda_executor(engine: Engine) -> CudaExecutor | None:
    """The engine's CUDA path; None without one (on CPU, or a model the kernels do not support)."""
    return engine.runner.cuda if isinstance(engine.runner, ModelRunner) else None


def _graph_replay_seconds(engine: Engine, batch: int, repeats: int = 20) -> float | None:
    cuda = _cuda_executor(engine)
    if cuda is None or cuda.graphs is None or not cuda.graphs.fits(batch, 1):
        return None
    size = next(b for b in cuda.graphs.batch_sizes if b >= batch)
    graph, _ = cuda.graphs._graphs[size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def prefill_point(engine: Engine, mut: ModelUnderTest, tokens: int, chunk: int, repeats: int = 5) -> float:
    """Median seconds to prefill one ``tokens``-token prompt in chunks of ``chunk`` (sum of its iterations)."""
    policy = engine.policy
    if not isinstance(policy, SarathiBatching):
        raise TypeError(f"prefill_point sets a token budget: needs SarathiBatching, got {type(policy).__name__}")
    saved = policy.token_budget
    policy.token_budget = chunk
    totals = []
    try:
        for rep in range(repeats + 1):
            prompt = random_prompts(1, tokens, mut.model.config.vocab_size, seed=tokens + rep)[0]
            engine.add_request(f"prefill-{tokens}-{chunk}-{rep}", prompt, SamplingParams(max_tokens=1))
            totals.append(sum(run_until_idle(engine)))
    finally:
        policy.token_budget = saved
    return median(totals[1:])


def prefill_flops(mut: ModelUnderTest, tokens: int) -> float:
    c = mut.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * mut.num_params * tokens + 2 * c.num_hidden_layers * tokens**2 * c.num_attention_heads * head_dim


def run(args) -> dict:
    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    env = environment(device)
    mut = build_model(args.model, device, dtype)
    bandwidth, flops = copy_bandwidth(device), matmul_rate(device)
    env.update(model=args.model, params=mut.num_params, copy_bandwidth_Bps=bandwidth, matmul_flops=flops)
    print(f"# {env['device']}  model {args.model} ({mut.num_params / 1e9:.2f} B params)  copy {bandwidth / 1e12:.2f}"
          f" TB/s  matmul {flops / 1e12:.0f} TFLOP/s  commit {env['commit']}  {env['date']}", flush=True)
    max_batch = max(args.batches)
    max_len = max(args.context + args.steps + 128, max(args.prefill_tokens) + 16)
    started = time.perf_counter()
    engine = make_engine(mut, device, max_batch, args.kv_gb, max_len, args.prefill_budget, graphs=not args.no_graphs,
                         fused=not args.no_fused_decode)
    cuda = _cuda_executor(engine)
    env["decode_forward"] = ("reference (no CUDA path)" if cuda is None else
                             ("fused" if cuda.fused is not None else "HF modules")
                             + (", CUDA graphs for decode" if cuda.graphs is not None else ", no graphs"))
    env["engine_init_s"] = time.perf_counter() - started
    vocab = mut.model.config.vocab_size
    result: dict = {"environment": env, "decode": [], "prefill": []}

    for batch in args.batches:
        point = decode_point(engine, mut, batch, args.context, args.steps)
        point["floor_s"] = (mut.streamed_weight_bytes + point["kv_bytes"]) / bandwidth
        if not args.skip_hf:
            point["hf_step_s"] = hf_baseline.generate_step_seconds(mut.model, batch, args.context, args.hf_steps,
                                                                   vocab, device)
        result["decode"].append(point)
        print(f"decode batch {batch}: {point['step_s'] * 1e3:.2f} ms/step (floor {point['floor_s'] * 1e3:.2f})",
              flush=True)

    for tokens, chunk in [(t, t) for t in args.prefill_tokens] + [(max(args.prefill_tokens), args.chunk)]:
        seconds = prefill_point(engine, mut, tokens, chunk)
        row = {"tokens": tokens, "chunk": chunk, "seconds": seconds,
               "tflops": prefill_flops(mut, tokens) / seconds / 1e12}
        if not args.skip_hf:
            row["hf_seconds"] = hf_baseline.forward_seconds(mut.model, tokens, vocab, device)
        result["prefill"].append(row)
    sync(device)

    if args.check_tokens:
        result["agreement"] = checks.greedy_agreement(engine, mut, args.check_tokens)
    if torch.device(device).type == "cuda":
        result["attention_variants"] = checks.attention_variants(max(b for b in args.batches if b <= 64),
                                                                 args.context, mut, device)
    if not args.skip_hf and args.hf_generate_batch:
        rate, note = hf_baseline.generate_batch_tokens_per_s(mut.model, args.hf_generate_batch, args.context,
                                                             args.hf_steps, vocab, device)
        result["hf_generate_batch"] = {"batch": args.hf_generate_batch, "tokens_per_s": rate, "note": note}
    write_json(args.json, result)
    print(format_report(result))
    return result


def format_report(result: dict) -> str:
    env = result["environment"]
    lines = [f"device {env['device']}, model {env['model']}, torch {env['torch']}, transformers {env['transformers']},"
             f" commit {env['commit']}, {env['date']}; copy {env['copy_bandwidth_Bps'] / 1e12:.2f} TB/s,"
             f" matmul {env['matmul_flops'] / 1e12:.0f} TFLOP/s; forward: {env.get('decode_forward')}", ""]
    rows = []
    for p in result["decode"]:
        hf = p.get("hf_step_s")
        rows.append([p["batch"], p["context"], p["step_s"] * 1e3, (p["gpu_step_s"] or float("nan")) * 1e3,
                     p["tokens_per_s"], hf * 1e3 if hf else "-", p["batch"] / hf if hf else "-",
                     p["tokens_per_s"] * hf / p["batch"] if hf else "-", p["floor_s"] * 1e3,
                     p["step_s"] / p["floor_s"]])
    lines.append(table(["batch", "context", "ours ms/step", "ours GPU ms/step", "ours tok/s", "HF generate ms/step",
                        "HF tok/s", "ours/HF tok/s", "floor ms", "ours/floor"], rows))
    rows = []
    for p in result["prefill"]:
        hf = p.get("hf_seconds")
        rows.append([p["tokens"], p["chunk"], p["seconds"] * 1e3, p["tflops"], hf * 1e3 if hf else "-",
                     p["seconds"] / hf if hf else "-"])
    lines += ["", table(["prompt tokens", "chunk", "ours ms", "ours TFLOP/s", "HF forward ms", "ours/HF"], rows)]
    if "hf_generate_batch" in result:
        g = result["hf_generate_batch"]
        lines += ["", f"HF generate_batch, batch {g['batch']}: {g['tokens_per_s'] or 'n/a'} tok/s ({g['note']})"]
    if "attention_variants" in result:
        lines += ["", checks.format_variants(result["attention_variants"])]
    if "agreement" in result:
        lines += ["", checks.format_agreement(result["agreement"])]
    return "\n".join(lines)
