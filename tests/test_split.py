"""`fastchat-ft split`: deterministic for a seed, the requested ratio, every valid record exactly once, and no
exact or near duplicate on both sides (clusters of edited copies are checked pair by pair)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fastchat_ft import _native
from fastchat_ft.cli import main
from fastchat_ft.data.split import assign_groups, split_file

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud maple ember").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edit(rng, s):
    words = s.split()
    words[rng.randrange(len(words))] = "zebra"
    return " ".join(words)


def make_file(tmp_path, seed, n_clusters=60):
    """Clusters: an original plus 0-4 copies (exact, or one word changed: Jaccard of word 3-grams >= ~0.9
    between any two members); some invalid lines."""
    rng = random.Random(seed)
    recs, cluster_of = [], []
    for c in range(n_clusters):
        base, question = text(rng, 120), text(rng, 8)
        for k in range(1 + rng.choice((0, 0, 1, 2, 4))):
            answer = base if k == 0 or rng.random() < 0.3 else edit(rng, base)
            recs.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
            cluster_of.append(c)
    order = list(range(len(recs)))
    rng.shuffle(order)
    lines = [json.dumps(recs[i]) for i in order]
    clusters = [cluster_of[i] for i in order]
    for pos in sorted(rng.sample(range(len(lines)), 3), reverse=True):
        lines.insert(pos, '{"messages": "not a list"}')
        clusters.insert(pos, None)
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f, lines, clusters


def test_split_keeps_clusters_whole_and_is_deterministic(tmp_path):
    f, lines, clusters = make_file(tmp_path, seed=4)
    res = split_file(f, val_ratio=0.2, seed=7, out_dir=tmp_path / "a")
    train = (tmp_path / "a" / "data.train.jsonl").read_text().splitlines()
    val = (tmp_path / "a" / "data.val.jsonl").read_text().splitlines()
    valid = [ln for ln, c in zip(lines, clusters) if c is not None]
    assert sorted(train + val) == sorted(valid)  # every valid record once, invalid ones left out
    assert res["skipped_invalid"] == 3
    assert len(val) == pytest.approx(0.2 * len(valid), abs=5)
    side = {}
    for ln in train:
        side[ln] = 0
    for ln in val:
        side[ln] = 1
    by_cluster = {}
    for ln, c in zip(lines, clusters):
        if c is not None:
            by_cluster.setdefault(c, set()).add(side[ln])
    assert all(len(s) == 1 for s in by_cluster.values()), "a near-duplicate cluster straddles the split"
    # No pair across the split is near-identical by the check's own measure.
    val_texts = [json.loads(v)["messages"][1]["content"] for v in val]
    for t in (json.loads(x)["messages"][1]["content"] for x in train):
        assert max(_native.minhash_similarity(t, v) for v in val_texts) < 0.8
    # Same seed: byte-identical files; another seed: a different split.
    split_file(f, val_ratio=0.2, seed=7, out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "data.val.jsonl").read_bytes() == (tmp_path / "a" / "data.val.jsonl").read_bytes()
    split_file(f, val_ratio=0.2, seed=8, out_dir=tmp_path / "c")
    assert (tmp_path / "c" / "data.val.jsonl").read_bytes() != (tmp_path / "a" / "data.val.jsonl").read_bytes()


def test_assign_groups_hits_the_target_with_whole_groups():
    rng = np.random.default_rng(0)
    groups = np.sort(rng.integers(0, 300, size=1000)).astype(np.uint32)
    usable = rng.random(1000) > 0.05
    val = assign_groups(groups, usable, 0.1, seed=3)
    assert not val[~usable].any()
    assert val.sum() == round(0.1 * usable.sum())
    for g in np.unique(groups[usable]):
        members = val[(groups == g) & usable]
        assert members.all() or not members.any()


def test_cli_json_array_input(tmp_path, capsys):
    rng = random.Random(1)
    recs = [{"conversations": [{"from": "human", "value": text(rng, 10)}, {"from": "gpt", "value": text(rng, 20)}]}
            for _ in range(30)]
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(recs))
    assert main(["split", str(f), "--val-ratio", "0.1", "--seed", "2", "--out-dir", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train"]["records"] == 27 and res["val"]["records"] == 3
    got = [json.loads(x) for x in (tmp_path / "sg.train.jsonl").read_text().splitlines()]
    got += [json.loads(x) for x in (tmp_path / "sg.val.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, recs))


def test_split_files_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    import os
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question number {i} about topic {i * 7}"},
                                                  {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                         for i in range(10)))
    old = os.umask(0o022)
    try:
        res = split_file(f, val_ratio=0.2, seed=1, out_dir=tmp_path / "out")
    finally:
        os.umask(old)
    for side in ("train", "val"):
        assert os.stat(res[side]["path"]).st_mode & 0o777 == 0o644, side
