"""`backtrack probe`: can the model tell its right answers from its wrong ones?

Physics of LMs 2.2 finds that retrying pays only when a model can detect its own errors, and
shows it with linear probes on hidden states. Here the probe reads the hidden state where the
backtracking phrase would go: each of the model's own train-split samples is cut where the
backtrack stage cuts it (`formats.cut_point`, i.e. before `</think>`), run through the model,
and the state of the last kept token (layer `layer`) is the feature. An L2-regularised logistic
regression learns right vs wrong on a train part of the problems; its AUROC on the held-out
problems comes with a percentile bootstrap CI over those problems. An AUROC near 0.5 tells a
user, before any training, that backtracking has little to work with: the model cannot know
when to retry. A one-feature probe on the cut length is reported beside it, since a probe can
ride on length alone.

Samples: the sample stage's records when the arm's model is the recipe's base model, else the
arm's model samples the train split itself (`probe/<arm>/samples/`, resumable).
Writes `probe/<arm>/metrics.json` and `run.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backtrack.config import option, store_values
from backtrack.errors import UserError
from backtrack.generation import GenerationConfig
from backtrack.layout import RunLayout


@dataclass
class ProbeConfig(GenerationConfig):
    """Linear probe on hidden states at the cut point: right vs wrong, held-out AUROC."""

    arm: str = option("base", "Arm whose model is probed (`backtrack arms`).")
    layer: int = option(-1, "Hidden-state layer as in output_hidden_states (0 = embeddings, "
                        "-1 = last).")
    k: int = option(4, "Samples per problem when the arm's model samples itself.",
                    in_store=False)
    limit: int = option(500, "Train problems the arm's model samples (when it samples itself).",
                        in_store=False)
    max_samples: int = option(4000, "At most this many samples (a stable hash choice) are run "
                              "through the model.")
    heldout_share: float = option(0.3, "Share of problems (by a stable hash) held out for the "
                                  "AUROC.")
    l2: float = option(1.0, "L2 penalty of the logistic regression on standardised features "
                       "(1.0 = scikit-learn's default C=1).")
    n_boot: int = option(1000, "Bootstrap resamples of held-out problems for the AUROC CI.")
    forward_batch: int = option(16, "Sequences per forward pass.", hashed=False)
    device: str = option("cpu", "Device for the forward passes (cpu, cuda).", hashed=False)

    def validate(self) -> None:
        from backtrack.arms import get_arm

        get_arm(self.arm)
        if not 0 < self.heldout_share < 1:
            raise UserError("option 'heldout_share': must be between 0 and 1")
        for name in ("k", "limit", "max_samples", "n_boot", "forward_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}': must be at least 1")
        if self.l2 < 0:
            raise UserError("option 'l2': must be 0 or more")


def outputs(config: ProbeConfig) -> list[Path]:
    return [RunLayout.of(config).probe(config.arm)]


# ------------------------------------------------------------------ samples


def own_samples(config: ProbeConfig, model_path: str) -> tuple[list[dict], Path]:
    """The arm's model's train-split samples: the sample stage's when it is the base model,
    else drawn now into probe/<arm>/samples/ (resuming)."""
    from backtrack.arms import model_source
    from backtrack.build import read_records

    layout = RunLayout.of(config)
    if model_source(config.arm) is None and layout.samples.is_dir():
        return read_records(layout.samples), layout.samples
    folder = layout.probe(config.arm) / "samples"
    sample_train_split(config, model_path, folder)
    return read_records(folder), folder


def sample_train_split(config: ProbeConfig, model_path: str, folder: Path) -> None:
    from backtrack.chat import render_prompt
    from backtrack.evaluate import model_identity
    from backtrack.generation import open_engine, sample_problems
    from backtrack.models import load_tokenizer
    from backtrack.store import RecordStore
    from backtrack.tasks import get_task

    task = get_task(config.task, config.task_args)
    problems = task.problems("train", config.limit)
    fingerprint = {"stage": "probe-samples", **store_values(GenerationConfig(**{
        k: getattr(config, k) for k in GenerationConfig.__dataclass_fields__})),
        "model": model_identity(model_path)}
    with RecordStore(folder, fingerprint) as store:
        if all((p.id, i, 0) in store.done_keys() for p in problems for i in range(config.k)):
            return
        tokenizer = load_tokenizer(model_path)
        prompts = {p.id: render_prompt(tokenizer, task.messages(p)) for p in problems}
        engine = open_engine(config, model_path)
        try:
            sample_problems(engine, task, problems, prompts, config.generation_params(config.k),
                            store, config.k, config.batch_size, desc=f"probe {config.arm}",
                            progress=config.progress)
        finally:
            engine.close()


def probe_inputs(records: list[dict], max_samples: int, where: str) -> list[dict]:
    """First-attempt records, at most `max_samples` (a stable hash choice), each with `text`:
    prompt + completion cut where the phrase would go."""
    from backtrack.build import require_keys
    from backtrack.engines import derive_seed
    from backtrack.formats import cut_point

    rows = []
    for r in records:
        if r.get("round", 0) != 0:
            continue
        require_keys(r, ("problem_id", "sample_idx", "prompt", "completion", "correct"), where)
        cut = cut_point(r["completion"], r.get("finish_reason", "stop"))
        rows.append({"problem_id": str(r["problem_id"]), "sample_idx": r["sample_idx"],
                     "correct": bool(r["correct"]), "text": r["prompt"] + r["completion"][:cut]})
    rows.sort(key=lambda r: derive_seed(0, "probe", r["problem_id"], r["sample_idx"]))
    return rows[:max_samples]


# ------------------------------------------------------------------ features


def hidden_states(model, tokenizer, texts: list[str], layer: int, batch: int, device: str):
    """(len(texts), hidden) float64 array: the layer's state at each text's last token.

    Texts are left-padded so the last token of every row sits at position -1; position ids
    count real tokens only, so padding changes nothing for models with absolute positions."""
    import numpy as np
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
    out = np.zeros((len(texts), model.config.hidden_size))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            enc = tokenizer([texts[i] for i in idx], add_special_tokens=False, padding=True,
                            return_tensors="pt").to(device)
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            result = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           position_ids=positions, output_hidden_states=True)
            out[idx] = result.hidden_states[layer][:, -1, :].double().cpu().numpy()
    return out


# ------------------------------------------------------------------ probe and AUROC


def fit_logistic(x, y, l2: float, max_iter: int = 200):
    """L2-regularised logistic regression (scikit-learn is not installed, and a probe is a
    few lines of torch): minimises mean log loss + l2 * |w|^2 / (2 n) on standardised
    features with L-BFGS, as sklearn's LogisticRegression(C=1/l2) does. Returns a scorer."""
    import numpy as np
    import torch

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    xt = torch.tensor((x - mean) / std, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) \
            + l2 * (w @ w) / (2 * len(y))
        loss.backward()
        return loss

    optimizer.step(closure)
    weights, bias = w.detach().numpy(), float(b.detach())
    return lambda features: ((np.asarray(features) - mean) / std) @ weights + bias


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan when one
    class is missing."""
    import numpy as np

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_ranks(values):
    """1-based ranks, ties sharing their mean rank (scipy's rankdata; scipy is not installed)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts + 1) / 2)[inverse]


def auroc_ci(scores, labels, groups, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """AUROC with a percentile CI from resampling whole problems (samples of one problem are
    not independent); resamples holding one class only are skipped. metrics.bootstrap_ci
    handles ratios of sums, which AUROC is not, hence this loop."""
    import numpy as np

    scores, labels, groups = np.asarray(scores), np.asarray(labels), np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        value = auroc(scores[idx], labels[idx])
        if value == value:
            stats.append(value)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha]) if stats else (float("nan"),) * 2
    return {"value": auroc(scores, labels), "low": float(low), "high": float(high),
            "resamples": len(stats)}


def heldout_mask(problem_ids: list[str], share: float, seed: int):
    import numpy as np

    from backtrack.engines import derive_seed

    return np.array([derive_seed(seed, "probe-split", pid) % 10_000 < share * 10_000
                     for pid in problem_ids])


def part_stats(rows: list[dict]) -> dict:
    return {"samples": len(rows), "right": sum(r["correct"] for r in rows),
            "problems": len({r["problem_id"] for r in rows})}


def evaluate_probe(rows: list[dict], features, config: ProbeConfig, where: str) -> dict:
    """Fit on the train problems, score the held-out ones: probe and length-only AUROC."""
    import numpy as np

    labels = np.array([r["correct"] for r in rows], dtype=float)
    held = heldout_mask([r["problem_id"] for r in rows], config.heldout_share, config.seed)
    for name, part in (("train", ~held), ("held-out", held)):
        if len(set(labels[part])) < 2:
            raise UserError(f"{where}: the probe's {name} part needs right and wrong samples "
                            f"({int(labels[part].sum())} right of {int(part.sum())}); sample "
                            "more problems or use a model that gets some right and some wrong")
    groups = [r["problem_id"] for r, h in zip(rows, held) if h]
    score = fit_logistic(features[~held], labels[~held], config.l2)
    held_scores = score(features[held])
    lengths = np.log1p([[len(r["text"])] for r in rows])
    by_length = fit_logistic(lengths[~held], labels[~held], config.l2)
    return {
        "train": part_stats([r for r, h in zip(rows, held) if not h]),
        "heldout": part_stats([r for r, h in zip(rows, held) if h]),
        "auroc": auroc_ci(held_scores, labels[held], groups, config.n_boot, config.seed),
        "length_auroc": auroc_ci(by_length(lengths[held]), labels[held], groups, config.n_boot,
                                 config.seed),
        "heldout_accuracy": float(((held_scores > 0) == labels[held].astype(bool)).mean()),
        "majority_accuracy": float(max(labels[held].mean(), 1 - labels[held].mean())),
    }


def main(config: ProbeConfig) -> dict:
    from backtrack.arms import model_path as arm_model_path
    from backtrack.fileio import write_json
    from backtrack.models import load_model, load_tokenizer
    from backtrack.runinfo import write_run_info

    model_path = arm_model_path(config.arm, config.model, config.output_dir)
    records, source = own_samples(config, model_path)
    rows = probe_inputs(records, config.max_samples, str(source))
    if not rows:
        raise UserError(f"{source}: no first-attempt samples to probe")
    tokenizer, model = load_tokenizer(model_path), load_model(model_path).to(config.device)
    model.eval()
    layers = model.config.num_hidden_layers + 1
    if not -layers <= config.layer < layers:
        raise UserError(f"option 'layer': {config.layer} is outside the model's {layers} "
                        "hidden-state layers")
    features = hidden_states(model, tokenizer, [r["text"] for r in rows], config.layer,
                             config.forward_batch, config.device)
    result = {"arm": config.arm, "model_path": model_path, "samples_from": str(source),
              "layer": config.layer, "hidden_size": int(features.shape[1]), "l2": config.l2,
              **evaluate_probe(rows, features, config, str(source))}
    out = RunLayout.of(config).probe(config.arm)
    write_json(out / "metrics.json", result)
    write_run_info(out, config, "probe", inputs=[source], extra={"model_path": model_path})
    a = result["auroc"]
    print(f"probe {config.arm}: held-out AUROC {a['value']:.3f} [{a['low']:.3f}, "
          f"{a['high']:.3f}] (length alone {result['length_auroc']['value']:.3f}) on "
          f"{result['heldout']['samples']} samples -> {out / 'metrics.json'}")
    return result
