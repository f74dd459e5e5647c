"""`rft_bt_confirm`: rft_bt plus confirm traces (right -> phrase -> the same answer, verified).

Trained only on wrong -> phrase -> right, a model sees the phrase exclusively after wrong
answers; SCoRe's analysis of STaR-style data finds that a model trained without right -> right
pairs learns to retract right answers, which is what rft_bt does in the toy world (its retries
turn right answers wrong far more often than wrong ones right). Confirm traces are right first
attempts sent through the same phrase by the backtrack stage (`backtrack.confirm: N`, records
with `kind: confirm`), kept when the continuation checks right with the first attempt's answer
(`backtracking.confirms`). They are mixed in at `build.confirm_share` of the examples that
carry the phrase. The first attempt of a confirm trace is right, so it always carries loss
(`loss_on: masked_wrong` masks wrong attempts only).
"""

from __future__ import annotations

from backtrack.arms import Arm, register
from backtrack.build import Example, prompt_text
from backtrack.errors import UserError
from backtrack.methods.rft import build_rft_bt, record_order


def confirm_examples(records: list[dict], tokenizer, where: str):
    """Confirm traces that kept their answer, identical texts of a problem once, in a stable
    hash order (so taking the first N is a fixed random choice); and the count of those sent."""
    from backtrack.backtracking import confirms
    from backtrack.build import require_keys
    from backtrack.engines import derive_seed

    sent = [r for r in records if r.get("kind") == "confirm"]
    kept, seen = [], set()
    for record in sorted(sent, key=record_order):
        require_keys(record, ("problem_id", "prompt", "chain"), where)
        if not confirms(record):
            continue
        step = record["chain"][1]
        text = step["prefix"] + step["phrase"] + step["completion"]
        if (str(record["problem_id"]), text.strip()) in seen:
            continue
        seen.add((str(record["problem_id"]), text.strip()))
        kept.append((derive_seed(0, "confirm-mix", *record_order(record)), record, text))
    kept.sort(key=lambda item: item[0])
    examples = [Example(str(r["problem_id"]), "confirm", prompt_text(tokenizer, r["prompt"], where),
                        text) for _, r, text in kept]
    return examples, len(sent)


def confirm_count(bt_examples: int, share: float) -> int:
    """Confirm examples that make up `share` of the phrase-carrying examples."""
    return round(bt_examples * share / (1 - share))


def build_rft_bt_confirm(context) -> tuple[list[Example], dict]:
    """The rft_bt examples, then confirm traces at `confirm_share` of the phrase examples."""
    examples, info = build_rft_bt(context)
    where = str(context.layout.backtrack)
    confirm, sent = confirm_examples(context.traces(), context.tokenizer, where)
    share = context.config.confirm_share
    if share > 0 and sent == 0:
        raise UserError(f"{where}: no confirm traces (records with kind: confirm) for arm "
                        "rft_bt_confirm; run the backtrack stage with `confirm: N` (e.g. "
                        "`backtrack backtrack --confirm 1000`)")
    wanted = confirm_count(info["bt_examples"], share)
    chosen = confirm[:wanted]
    return examples + chosen, {**info, "confirm_sent": sent, "confirm_kept": len(confirm),
                               "confirm_wanted": wanted, "confirm_examples": len(chosen)}


register(Arm("rft_bt_confirm", "rft_bt plus right -> phrase -> same answer traces (confirm)",
             training="sft", build=build_rft_bt_confirm, reads=("sample", "backtrack"),
             stage_args={"backtrack": {"confirm": 1000}}, compare_with=("rft_bt", "rft")))
