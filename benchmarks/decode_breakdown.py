"""Where one hf engine call's time goes, at the sampling benchmark's lever shape.

benchmarks/sampling.py gives each engine option's share of the compute bound; this says what
the rest of a call is, for the toy recipe's default engine (`decode: compact`,
`shared_prefix`): the prompt prefill, the decode steps' attention (`cpu_kernel`'s unless
`--torch-attention`) and linears, the sampling draws, and everything else (the decode loop,
cache copies, norms, rotary, residuals). Each part is timed by wrapping its function (CPU ops
are synchronous), summed over `--calls` calls after a warm-up call; the wrappers add a little
time of their own.

    python benchmarks/decode_breakdown.py --model <toy base> --calls 5
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from types import SimpleNamespace

from sampling import toy_model_path  # noqa: E402  (benchmarks/ is the script's folder)


def timed(totals: Counter, name: str, function, phase: list | None = None, sets: str = ""):
    """`function` adding its seconds to totals[name] ("{phase}" in it: the phase it ran in);
    with `sets`, the phase is `sets` while it runs."""
    def wrapper(*args, **kwargs):
        start, outer = time.perf_counter(), phase[0] if phase else ""
        if sets:
            phase[0] = sets
        try:
            return function(*args, **kwargs)
        finally:
            totals[name.format(phase=phase[0] if phase else "")] += time.perf_counter() - start
            if sets:
                phase[0] = outer
    return wrapper


def instrument(engine, totals: Counter) -> None:
    """Wrap the parts of a call (in this process only)."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from backtrack.engines import cpu_linear, hf_decode, hf_prefix, hf_step

    phase = ["other"]
    engine._prefill = timed(totals, "prompt prefill", engine._prefill, phase, "prefill")
    step = hf_step.shared_prefix_step
    hf_step.shared_prefix_step = lambda model, **kw: timed(totals, "decode steps",
                                                           step(model, **kw), phase, "decode")
    hf_decode.sample_tokens = timed(totals, "sampling", hf_decode.sample_tokens)
    attention = timed(totals, "  attention in {phase}", hf_prefix.shared_prefix_attention, phase)
    ALL_ATTENTION_FUNCTIONS._global_mapping[hf_prefix.NAME] = attention
    # the decode step's own calls (`hf_step.PlainLayer`): attention, and linears by F.linear
    hf_step.shared_prefix_attention = attention
    hf_step.F = SimpleNamespace(**{name: getattr(hf_step.F, name) for name in dir(hf_step.F)})
    hf_step.F.linear = timed(totals, "  linears in {phase}", torch.nn.functional.linear, phase)
    # ... or, with cpu_kernel, the packed kernel's
    cpu_linear.PackedLinear.__call__ = timed(totals, "  linears in {phase}",
                                             cpu_linear.PackedLinear.__call__, phase)
    # (sdpa, which the prefill's attention calls, is inside the wrapper above: wrapping it
    # too counted the prefill's attention twice, as this script did until 2026-12-07)
    for module in engine.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = timed(totals, "  linears in {phase}", module.forward, phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="a toy base folder (or `toy`)")
    parser.add_argument("--output-dir", default="runs/default")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-attention", action="store_true",
                        help="decode attention by torch's matmuls, not the recipe's cpu_kernel")
    parser.add_argument("--kv-cache-dtype", default="float16",
                        help="the kernel's keys and values (the recipe's float16, or auto)")
    args = parser.parse_args()

    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams, make_engine
    from backtrack.tasks import get_task

    path = toy_model_path(args.output_dir) if args.model == "toy" else args.model
    engine = make_engine("hf", path, batch_size=args.problems * args.k, num_threads=args.threads,
                         cache="dynamic", decode="compact", shared_prefix=True,
                         cpu_kernel=not args.torch_attention,
                         kv_cache_dtype=None if args.torch_attention else args.kv_cache_dtype)
    task = get_task("arith", {})
    prompts = [render_prompt(engine.tokenizer, task.messages(p))
               for p in task.problems("train", args.problems)]
    params = GenerationParams(n=args.k, temperature=0.8, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, seed=0)
    engine.generate(prompts, params)  # warm-up; also registers the attention wrapped below
    totals: Counter = Counter()
    instrument(engine, totals)
    start, tokens = time.perf_counter(), 0
    for _ in range(args.calls):
        tokens += sum(c.new_tokens for row in engine.generate(prompts, params) for c in row)
    wall = (time.perf_counter() - start) / args.calls
    print(f"{path}: {args.problems} prompts x {args.k}, {tokens // args.calls:,} new tokens "
          f"per call, {1e3 * wall:.0f} ms per call ({args.threads} thread(s))")
    order = ["prompt prefill", "  linears in prefill", "  attention in prefill", "decode steps",
             "  linears in decode", "  attention in decode", "sampling"]
    for name in order + sorted(set(totals) - set(order)):
        seconds = totals.get(name, 0.0) / args.calls
        print(f"  {name:<24} {1e3 * seconds:7.1f} ms {100 * seconds / wall:5.1f} %")
    rest = wall - sum(totals[name] for name in ("prompt prefill", "decode steps", "sampling")) \
        / args.calls
    print(f"  {'everything else':<24} {1e3 * rest:7.1f} ms {100 * rest / wall:5.1f} %")


if __name__ == "__main__":
    main()
