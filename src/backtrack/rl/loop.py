"""The RL stage's training loop: setup, one step (rollouts -> advantages -> update), saving."""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from backtrack.errors import UserError
from backtrack.layout import RunLayout
from backtrack.rl import checkpoints as ckpt
from backtrack.rl.stage import (RLConfig, method_at, problems_at, second_attempt_text)


@dataclass
class Context:
    config: RLConfig
    parent_path: str
    accelerator: object
    policy: object  # prepared (DDP-wrapped when distributed)
    reference: object
    optimizer: object
    tokenizer: object
    engine: object
    task: object
    problems: list
    methods: dict
    settings: object
    end_id: int
    folder: Path  # checkpoints and the live log

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.policy)


def make_accelerator(config: RLConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from backtrack.trackers import require_tracker

    require_tracker(config.report_to)
    log_with = None if config.report_to == "none" else config.report_to
    out = Path(config.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    return Accelerator(log_with=log_with, project_config=project,
                       cpu=not torch.cuda.is_available())


def setup(config: RLConfig, parent_path: str) -> Context:
    import torch
    from accelerate.utils import set_seed

    from backtrack.build import end_of_turn_text
    from backtrack.engines import check_options
    from backtrack.engines.hf import HFEngine
    from backtrack.models import load_model, load_tokenizer
    from backtrack.rl.algorithm import make_methods
    from backtrack.rl.rollout import RolloutSettings
    from backtrack.tasks import get_task

    methods = make_methods(config.kl, config.kl_stage1_attempt1, config.kl_stage1_attempt2,
                           config.alpha)
    task = get_task(config.task, config.task_args)
    reader = None
    if config.reward_on == "final_attempt" or config.method == "process":
        from backtrack.rl.stage import FinalAttemptTask, trace_reader

        reader = trace_reader(config, task)
        if config.reward_on == "final_attempt":
            task = FinalAttemptTask(task, reader.final_text)
    problems = task.problems("train")
    if not problems:
        raise UserError(f"task '{config.task}': the train split has no problems")
    check_options("hf", HFEngine, config.engine_args)
    accelerator = make_accelerator(config)
    if config.problems_per_step % accelerator.num_processes:
        raise UserError(f"option 'problems_per_step': {config.problems_per_step} is not a "
                        f"multiple of the {accelerator.num_processes} processes")
    set_seed(config.seed)
    tokenizer = load_tokenizer(parent_path)
    policy = load_model(parent_path).to(accelerator.device)
    reference = load_model(parent_path).to(accelerator.device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    engine = HFEngine(parent_path, device=str(accelerator.device),
                      model=accelerator.unwrap_model(policy), tokenizer=tokenizer,
                      **config.engine_args)
    end_ids = tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
    end_id = end_ids[-1] if end_ids and end_ids[-1] in engine.eos_ids else engine.eos_ids[0]
    settings = RolloutSettings(config.group_size, config.temperature, config.top_p,
                               config.max_new_tokens, config.second_attempt,
                               second_attempt_text(config),
                               reader.split_steps if config.method == "process" else None)
    folder = RunLayout.of(config).checkpoints(config.arm)
    return Context(config, parent_path, accelerator, policy, reference, optimizer, tokenizer,
                   engine, task, problems, methods, settings, end_id, folder)


def _chunks(count: int, size: int) -> list[range]:
    size = size or count
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def _step_table(advantages: list[list[float]]):
    """Per-rollout step advantages as a [rollouts, steps] tensor padded with 0."""
    import torch

    width = max((len(row) for row in advantages), default=0) or 1
    return torch.tensor([row + [0.0] * (width - len(row)) for row in advantages])


def update(ctx: Context, method, rollouts) -> dict:
    """Advantages, one batched forward/backward over the step's rows (each group's prompt run
    once, `rl.shared_forward`), an optimizer step."""
    import torch

    from backtrack.rl import algorithm as alg
    from backtrack.rl.shared_forward import shared_batch, shared_logps, to_device

    c, acc = ctx.config, ctx.accelerator
    rows = rollouts.rows
    seg_adv = alg.segment_advantages(method, rollouts.rewards, c.group_size, c.baseline,
                                     c.scale_std)
    trained = {alg.segment_id(s) for s in method.rules}
    step_adv = _step_table(alg.step_advantages(rollouts.steps, c.group_size, c.baseline)) \
        if method.uses_steps else None
    batches, weights = [], []
    for chunk in _chunks(len(rows), c.micro_batch_rows):
        part = [rows[i] for i in chunk]
        batch = shared_batch(part, [r.rollout // c.group_size for r in part], trained,
                             ctx.engine.pad_id, c.share_prompt_forward)
        weights.append(tuple(t.to(acc.device) for t in alg.token_weights(
            method, batch.targets, torch.tensor([r.rollout for r in part]), seg_adv,
            batch.steps, step_adv)))
        batches.append(to_device(batch, acc.device))
    local_tokens = sum(mask.sum() for _, _, mask in weights)
    num_items = acc.reduce(local_tokens.clone(), "sum") / acc.num_processes
    start = time.perf_counter()
    ctx.policy.train()
    total_loss, kl_sum = 0.0, 0.0
    for i, (batch, (adv, kl_w, loss_mask)) in enumerate(zip(batches, weights)):
        with torch.no_grad():
            ref_logps = shared_logps(ctx.reference, batch, c.temperature)
        sync = nullcontext() if i == len(batches) - 1 else acc.no_sync(ctx.policy)
        with sync:
            logps = shared_logps(ctx.policy, batch, c.temperature)
            loss, stats = alg.policy_loss(
                logps, adv, loss_mask, kl_weights=kl_w, ref_logps=ref_logps,
                loss_type=c.loss_type, epsilon_low=c.epsilon, epsilon_high=c.epsilon_high,
                num_items=num_items, max_completion_length=c.max_new_tokens)
            if c.loss_type in ("grpo", "dr_grpo"):
                loss = loss * len(adv) / len(rows)
            elif c.loss_type == "bnpo":
                loss = loss * loss_mask.sum() / local_tokens.clamp(min=1)
            acc.backward(loss)
        total_loss += float(loss.detach())
        kl_sum += stats["kl"] * stats["tokens"]
    grad_norm = (acc.clip_grad_norm_(ctx.policy.parameters(), c.max_grad_norm)
                 if c.max_grad_norm > 0 else None)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return {"loss": total_loss, "kl_sum": kl_sum, "tokens": float(local_tokens),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "seconds_forward_backward": time.perf_counter() - start}


def train_step(ctx: Context, step: int, started: float) -> dict:
    from backtrack.engines import derive_seed
    from backtrack.rl.rollout import collect

    c, acc = ctx.config, ctx.accelerator
    method = method_at(c, ctx.methods, step)
    problems = problems_at(c, ctx.problems, step, acc.process_index, acc.num_processes)
    ctx.model.eval()
    rollouts = collect(ctx.engine, ctx.task, ctx.tokenizer, problems, method.attempts,
                       ctx.settings, derive_seed(c.seed, "rl-step", step, acc.process_index),
                       ctx.end_id)
    result = update(ctx, method, rollouts)
    return log_entry(ctx, step, method, rollouts, result, started)


def log_entry(ctx: Context, step: int, method, rollouts, result: dict, started: float) -> dict:
    """The step's log line, summed over processes (timings are this process's)."""
    import torch

    r1 = torch.tensor(rollouts.rewards["r1"])
    r2 = torch.tensor(rollouts.rewards.get("r2", rollouts.rewards["r1"]))
    sums = torch.tensor([float(r1.sum()), float(r2.sum()), float(len(r1)),
                         float(((r1 == 0) & (r2 > 0)).sum()), float(((r1 > 0) & (r2 == 0)).sum()),
                         float(rollouts.new_tokens), result["kl_sum"], result["tokens"],
                         result["loss"]], device=ctx.accelerator.device)
    s = ctx.accelerator.reduce(sums, "sum").tolist()
    two = method.attempts == 2
    gen, fwd = rollouts.generation_seconds, result["seconds_forward_backward"]
    total = time.perf_counter() - started
    return {"step": step + 1, "stage": method.name, "reward": s[1] / s[2] if two else s[0] / s[2],
            "accuracy_attempt1": s[0] / s[2], "accuracy_attempt2": s[1] / s[2] if two else None,
            "wrong_to_right": s[3] / s[2] if two else None,
            "right_to_wrong": s[4] / s[2] if two else None,
            "kl": s[6] / max(s[7], 1.0), "loss": s[8] / ctx.accelerator.num_processes,
            "grad_norm": result["grad_norm"], "rollouts": int(s[2]), "new_tokens": int(s[5]),
            "tokens_per_second": s[5] / ctx.accelerator.num_processes / max(gen, 1e-9),
            "seconds_generation": gen, "seconds_forward_backward": fwd,
            "seconds_other": total - gen - fwd, "seconds_total": total}


def save_final(ctx: Context, log: list[dict], extra: dict) -> Path:
    """Assemble models/<arm>/ in a temp folder on the main process, then rename it."""
    from backtrack.fileio import replace_dir
    from backtrack.runinfo import write_run_info

    c, acc = ctx.config, ctx.accelerator
    final = RunLayout.of(c).model(c.arm)
    tmp = final.with_name(f".{c.arm}.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(ctx.policy)  # on every process: ZeRO-3/FSDP gather
    if acc.is_main_process:
        ctx.model.save_pretrained(str(tmp), state_dict=state_dict)
        ctx.tokenizer.save_pretrained(str(tmp))
        ckpt.write_log(tmp / "rl_log.json", log)
        ckpt.plot_log(log, tmp / "rl_log.png", f"{c.arm} ({c.method}, from {c.parent})")
        write_run_info(tmp, c, "rl", inputs=[], extra={
            "parent_model": ctx.parent_path, "global_step": len(log),
            "world_size": acc.num_processes, **ckpt.summary(log), **extra})
        replace_dir(tmp, final)
    acc.wait_for_everyone()
    return final


def tracker_config(config: RLConfig) -> dict:
    """The config as scalars (trackers such as tensorboard's hparams take no dicts/lists)."""
    import dataclasses
    import json

    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for k, v in dataclasses.asdict(config).items()}


def _progress(entry: dict) -> str:
    acc2 = entry["accuracy_attempt2"]
    return (f"rl step {entry['step']} [{entry['stage']}]: reward {entry['reward']:.3f}, acc1 "
            f"{entry['accuracy_attempt1']:.3f}" + (f", acc2 {acc2:.3f}" if acc2 is not None else "")
            + f", kl {entry['kl']:.4f}, loss {entry['loss']:.4f}, "
            f"{entry['tokens_per_second']:.0f} tok/s, {entry['seconds_total']:.1f} s")


def run(config: RLConfig, parent_path: str) -> Path:
    ctx = setup(config, parent_path)
    acc = ctx.accelerator
    resume_from = ckpt.prepare_folder(acc, ctx.folder, config.resume)
    start, log = ckpt.load(acc, resume_from) if resume_from else (0, [])
    if config.report_to != "none":
        acc.init_trackers(f"rl_{config.arm}", config=tracker_config(config))
    started, cpu_start = time.perf_counter(), time.process_time()
    for step in range(start, config.steps):
        entry = train_step(ctx, step, started)
        log.append(entry)
        if acc.is_main_process:
            ckpt.write_log(ctx.folder / "rl_log.json", log)
            if entry["step"] % config.logging_steps == 0 or entry["step"] == config.steps:
                print(_progress(entry), flush=True)
        acc.log({k: v for k, v in entry.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=entry["step"])
        if entry["step"] % config.save_steps == 0 and entry["step"] < config.steps:
            ckpt.save(acc, ctx.folder, entry["step"], log, config.save_total_limit)
        # the next step starts where this one's clock stopped, so writing the log and the
        # checkpoint count in the next step's seconds_other
        started += entry["seconds_total"]
    final = save_final(ctx, log, {"resumed_from": str(resume_from) if resume_from else None,
                                  "steps_this_run": config.steps - start,
                                  "cpu_seconds": time.process_time() - cpu_start})
    acc.end_training()
    ctx.engine.close()
    if acc.is_main_process:
        print(f"{config.arm}: {len(log)} RL steps ({config.method}) from {config.parent} -> "
              f"{final}")
    return final
