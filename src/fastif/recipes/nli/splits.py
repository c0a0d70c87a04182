"""Seeded, documented splits of the evaluation data into candidate pool / anchor (validation) / test parts.

The rule is the same everywhere: within each stratum, order the records by SHA-256 of ``"<salt>:<seed>:<id>"``
(:func:`fastif.recipes.nli.data.seeded_split`) and cut the order at fixed fractions. Strata are HANS subcases (30 of
1,000 examples each) and ANLI (round, label) cells, so every part keeps the source's balance. Hash order depends
only on the ids, so the parts never drift with file order or library versions, and they are disjoint by
construction. Fixed samples of a part (the anchors the loop draws from, the test points it evaluates on) take
the first examples of each stratum's order, so a larger sample contains a smaller one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ...applications.finetune.config import SplitConfig
from ...data.text import TextRecord
from ...errors import DataError
from .data import ANLI_ROUNDS, HANS_HEURISTICS, load_embedded, seeded_split


@dataclass(frozen=True)
class TaskSplit:
    """Per group (HANS heuristic / ANLI round): the anchor sample and the test sample; plus the pool, if any."""

    anchors: dict[str, list[TextRecord]]
    test: dict[str, list[TextRecord]]
    pool: list[TextRecord]

    def sizes(self) -> dict[str, dict[str, int]]:
        """Number of records in each part, per group (for the results file)."""
        return {
            "anchors": {group: len(records) for group, records in self.anchors.items()},
            "test": {group: len(records) for group, records in self.test.items()},
            "pool": {"all": len(self.pool)},
        }


def stratify(records: Sequence[TextRecord], key: Callable[[TextRecord], str]) -> dict[str, list[TextRecord]]:
    """Records grouped by ``key``, strata in sorted order, file order within each."""
    strata: dict[str, list[TextRecord]] = defaultdict(list)
    for record in records:
        strata[key(record)].append(record)
    return {name: strata[name] for name in sorted(strata)}


def split_fractions(
    records: Sequence[TextRecord], fractions: Sequence[float], seed: int, salt: str
) -> list[list[TextRecord]]:
    """Hash-order ``records`` and cut them into consecutive parts of the given fractions (the rest last)."""
    sizes = [round(fraction * len(records)) for fraction in fractions]
    return seeded_split(records, [*sizes, len(records) - sum(sizes)], seed, salt)


def stratified_sample(strata: dict[str, list[TextRecord]], total: int, seed: int, salt: str) -> list[TextRecord]:
    """``total`` records spread evenly over the strata (first in each stratum's hash order); 0 = all of them."""
    if total == 0:
        return [record for records in strata.values() for record in records]
    per_stratum, extra = divmod(total, len(strata))
    sample = []
    for rank, records in enumerate(strata.values()):
        want = per_stratum + (1 if rank < extra else 0)
        if want > len(records):
            raise DataError(f"cannot sample {want} records from a stratum of {len(records)}; lower the sample size")
        sample += seeded_split(records, [want], seed, salt)[0]
    return sample


@lru_cache(maxsize=8)
def embedded_records(name: str, num_labels: int) -> tuple[TextRecord, ...]:
    """A bundled set, read once per process (HANS eval alone takes seconds to parse); treat it as read-only."""
    return tuple(load_embedded(name, num_labels))


def _hans_subcase(record: TextRecord) -> str:
    return str(record.extra.get("subcase"))


def _heuristic(record: TextRecord) -> str:
    return str(record.extra.get("heuristic"))


def hans_split(config: SplitConfig, groups: Sequence[str] = HANS_HEURISTICS) -> TaskSplit:
    """HANS eval (30,000): per subcase, the first ``anchor_fraction`` in hash order are anchors, the rest test."""
    records = embedded_records("hans_eval", 2)
    anchors: dict[str, list[TextRecord]] = {}
    test: dict[str, list[TextRecord]] = {}
    for group in groups:
        subcases = stratify([r for r in records if _heuristic(r) == group], _hans_subcase)
        cut = {
            name: split_fractions(part, [config.anchor_fraction], config.seed, "hans")
            for name, part in subcases.items()
        }
        anchors[group] = stratified_sample({n: p[0] for n, p in cut.items()}, config.anchor_pool, config.seed, "anchor")
        test[group] = stratified_sample({n: p[1] for n, p in cut.items()}, config.eval_size, config.seed, "eval")
    return TaskSplit(anchors, test, [])


def hans_pool(size: int, seed: int) -> list[TextRecord]:
    """The HANS training set (29,035) as augmentation pool; ``size`` > 0 takes a sample stratified by subcase."""
    records = list(embedded_records("hans_train", 2))
    return stratified_sample(stratify(records, _hans_subcase), size, seed, "hans_pool") if size else records


def anli_split(config: SplitConfig, groups: Sequence[str] = ANLI_ROUNDS) -> TaskSplit:
    """ANLI dev r1-r3 (3,198): per (round, label), hash order cut into pool / anchors / test (disjoint)."""
    anchors: dict[str, list[TextRecord]] = {}
    test: dict[str, list[TextRecord]] = {}
    pool: list[TextRecord] = []
    for group in ANLI_ROUNDS:
        cells = stratify(embedded_records(f"anli_{group}", 3), lambda r: r.label_name)
        fractions = [config.pool_fraction, config.anchor_fraction]
        cut = {name: split_fractions(rs, fractions, config.seed, f"anli_{group}") for name, rs in cells.items()}
        pool += [record for parts in cut.values() for record in parts[0]]
        if group in groups:
            anchors[group] = stratified_sample({n: p[1] for n, p in cut.items()}, config.anchor_pool, config.seed, "a")
            test[group] = stratified_sample({n: p[2] for n, p in cut.items()}, config.eval_size, config.seed, "e")
    return TaskSplit(anchors, test, pool)


def task_split(task: str, config: SplitConfig, groups: Sequence[str]) -> TaskSplit:
    """The split of ``task`` ('hans' or 'anli') for ``groups``."""
    if task == "hans":
        return hans_split(config, groups)
    return anli_split(config, groups)
